//! Deleting many records at once (`hub device-identity delete --all`, `registration delete
//! --group-id G --all`): one request per record through the service API, a result per record,
//! and a failure that does not stop the rest but does fail the command.

use anyhow::bail;
use serde_json::{json, Value};

use super::print_result;

/// Deleting everything of a kind is only done when `--yes` says so: a script that ran with
/// `--all` by mistake must not wipe a registry.
pub fn confirm(yes: bool, count: usize, what: &str) -> anyhow::Result<()> {
    if !yes {
        bail!("this would delete all {count} {what}; add --yes to confirm");
    }
    Ok(())
}

/// Prints `{<key>: id, "deleted": true}` per record (`"deleted": false` and `"error"` for one
/// that failed) through `--query`/`-o`; an error afterwards when any failed.
pub fn report(key: &str, results: Vec<(String, anyhow::Result<()>)>) -> anyhow::Result<()> {
    let total = results.len();
    let mut failed = 0;
    let rows: Vec<Value> = results
        .into_iter()
        .map(|(id, result)| match result {
            Ok(()) => json!({ key: id, "deleted": true }),
            Err(e) => {
                failed += 1;
                json!({ key: id, "deleted": false, "error": format!("{e:#}") })
            }
        })
        .collect();
    print_result(&Value::Array(rows))?;
    if failed > 0 {
        bail!("{failed} of {total} deletions failed");
    }
    Ok(())
}
