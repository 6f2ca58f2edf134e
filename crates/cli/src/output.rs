//! Standard output for every command. `println!` panics when stdout is gone ("failed printing
//! to stdout: Broken pipe" under `fleetgate ... | head`); these write the same text and treat a
//! closed pipe as the reader having seen enough: a clean, silent exit. Results (JSON values)
//! go through [`print_result`], which applies `--query` and `-o/--output`.

use std::fmt;
use std::io::{ErrorKind, IsTerminal, Write};
use std::sync::OnceLock;

use anyhow::anyhow;
use serde_json::Value;

use crate::render::{self, Format};

/// Writes `args` to stdout and flushes (output such as `hub monitor-events` is read as it
/// comes). A reader that went away ends the process with success; any other write failure
/// ends it with an error.
pub fn write(args: fmt::Arguments<'_>) {
    if let Err(e) = try_write(args) {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // stderr may be gone too: nothing more to do than the exit status then.
        let _ = writeln!(std::io::stderr(), "error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Writes `args` to stdout, ignoring failures: for a long-running server, whose work does not
/// depend on anyone reading its banner.
pub fn write_best_effort(args: fmt::Arguments<'_>) {
    let _ = try_write(args);
}

fn try_write(args: fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.flush()
}

/// What `-o/--output` and `--query` asked for, set once at start-up.
struct ResultSettings {
    format: Format,
    query: Option<String>,
}

static SETTINGS: OnceLock<ResultSettings> = OnceLock::new();

/// Sets the format and query every [`print_result`] uses. The query is compiled here, so a bad
/// expression is reported before the command changes anything.
pub fn configure(format: Format, query: Option<String>) -> anyhow::Result<()> {
    if let Some(q) = &query {
        jmespath::compile(q).map_err(|e| anyhow!("--query is not a valid JMESPath expression:\n{e}"))?;
    }
    let _ = SETTINGS.set(ResultSettings { format, query });
    Ok(())
}

/// Prints a command's result: the `--query` applied first, then in the `-o/--output` format.
/// Every command that prints JSON results prints them through here.
pub fn print_result(v: &Value) -> anyhow::Result<()> {
    let default = ResultSettings { format: Format::Json, query: None };
    let settings = SETTINGS.get().unwrap_or(&default);
    let queried;
    let v = match &settings.query {
        Some(q) => {
            queried = apply_query(q, v)?;
            &queried
        }
        None => v,
    };
    let text = match settings.format {
        Format::Json => render::json(v),
        Format::Jsonc if color_wanted() => render::json_color(v),
        Format::Jsonc => render::json(v),
        // az sorts the columns unless a query chose them.
        Format::Table => render::table(v, settings.query.is_none()).map_err(|e| anyhow!(e))?,
        Format::Tsv => render::tsv(v),
    };
    write(format_args!("{text}"));
    Ok(())
}

/// Whether results print as plain JSON (no `--query`, `-o json`): commands that stream JSON
/// lines keep doing so then, and otherwise print one result for the formats to work on.
pub fn plain_json() -> bool {
    SETTINGS.get().is_none_or(|s| s.format == Format::Json && s.query.is_none())
}

/// A JMESPath search of `v` (as `az --query`).
fn apply_query(q: &str, v: &Value) -> anyhow::Result<Value> {
    let expr = jmespath::compile(q).map_err(|e| anyhow!("--query is not a valid JMESPath expression:\n{e}"))?;
    let data = jmespath::Variable::try_from(v).map_err(|e| anyhow!("--query: {e}"))?;
    let found = expr.search(data).map_err(|e| anyhow!("--query failed:\n{e}"))?;
    Ok(serde_json::to_value(&*found)?)
}

/// Colors only for a terminal, and not when NO_COLOR asks for none (no-color.org).
fn color_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
