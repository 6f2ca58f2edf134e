//! Standard output for every command. `println!` panics when stdout is gone ("failed printing
//! to stdout: Broken pipe" under `fleetgate ... | head`); these write the same text and treat a
//! closed pipe as the reader having seen enough: a clean, silent exit.

use std::fmt;
use std::io::{ErrorKind, Write};

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
