//! `fleetgate audit`: the audit trail of the instance (attestation attempts, hub connections,
//! service-side changes), one JSON object per entry, oldest first; `--limit` keeps the newest.
//! With `--query` or another `-o` format, the entries are one JSON array. Read through the
//! running server's service API (`GET /audit`, the owner policy's `ServiceConfig` right), which
//! also has every entry it recorded until the call.

use fleetgate_core::time::Timestamp;

use super::{client, describe};
use crate::Target;

#[derive(clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    target: Target,
    /// Entries at or after this time: RFC 3339 (2026-11-28T14:00:00Z, 2026-11-28T15:00:00+01:00),
    /// a UTC date (2026-11-28), or a time ago (45s, 30m, 1h, 2d, 1w).
    #[arg(long, value_parser = parse_since)]
    since: Option<Timestamp>,
    /// Entries about this registration id (or device id, group id, policy).
    #[arg(long, visible_alias = "device-id")]
    registration_id: Option<String>,
    /// Only entries with this outcome.
    #[arg(long, value_parser = ["success", "failure"])]
    outcome: Option<String>,
    /// At most this many entries: the newest that match (still printed oldest first); 0 for all.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let since = args.since.map(Timestamp::to_azure_string);
    let entries = client(&args.target)?
        .audit(since.as_deref(), args.registration_id.as_deref(), args.outcome.as_deref(), args.limit)
        .await
        .map_err(describe)?;
    if !crate::output::plain_json() {
        return crate::output::print_result(&serde_json::to_value(&entries)?);
    }
    for e in entries {
        outln!("{}", serde_json::to_string(&e)?);
    }
    Ok(())
}

/// `--since`: an RFC 3339 time, a date (midnight UTC) or a duration back from now.
fn parse_since(s: &str) -> Result<Timestamp, String> {
    let s = s.trim();
    if let Some(ago) = parse_ago(s) {
        let now = Timestamp::now();
        return Ok(Timestamp::from_ticks(now.ticks().saturating_sub(ago.saturating_mul(10_000_000))));
    }
    let full = if s.len() == 10 { format!("{s}T00:00:00Z") } else { s.to_owned() };
    let t = time::OffsetDateTime::parse(&full, &time::format_description::well_known::Rfc3339).map_err(|_| {
        format!("'{s}' is not a time: use RFC 3339 (2026-11-28T14:00:00Z), a date (2026-11-28) or an age (30m, 1h, 2d)")
    })?;
    let ticks = t.unix_timestamp_nanos() / 100;
    i64::try_from(ticks).map(Timestamp::from_ticks).map_err(|_| format!("'{s}' is out of range"))
}

/// Seconds in an age such as `45s`, `30m`, `1h`, `2d`, `1w`.
fn parse_ago(s: &str) -> Option<i64> {
    let unit = match s.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    let n = &s[..s.len() - 1];
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse::<i64>().ok()?.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        let now = Timestamp::now().unix_seconds();
        let ago = |s| now - parse_since(s).unwrap().unix_seconds();
        assert!((3599..=3601).contains(&ago("1h")));
        assert!((1799..=1801).contains(&ago("30m")));
        assert!((2 * 86_400 - 1..=2 * 86_400 + 1).contains(&ago("2d")));
        let t = |s| parse_since(s).unwrap().to_azure_string();
        assert_eq!(t("2026-11-28"), "2026-11-28T00:00:00.0000000Z");
        assert_eq!(t("2026-11-28T15:00:00+01:00"), "2026-11-28T14:00:00.0000000Z");
        assert_eq!(t("2026-11-28T14:00:00.5Z"), "2026-11-28T14:00:00.5000000Z");
        for bad in ["yesterday", "", "h", "1y", "-1h", "2026-13-01", "2026-02-30", "2026-11-28T14:00"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }
}
