//! `fleetgate events verify`: looks for damage in every segment and changes nothing.
//!
//! Readers find damage only in what they read, and a sealed segment is read only when someone
//! asks for its positions, so damage to older telemetry can go unnoticed until no backup holds a
//! good copy. Verify reads every record of every segment (each checked against its CRC, as a read
//! is), takes no lock and writes nothing: it runs beside a running server as well as offline.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::segment::{file_name, scan_skipping, Damage, ScanEnd};
use super::{segment_firsts, EventLogError};

/// What a scan of a segment's first `len` bytes found: what both verify and repair go by.
pub(super) struct Inspection {
    pub records: u64,
    /// Ranges that are not whole records, with whole records after them.
    pub damage: Vec<Damage>,
    /// Where the whole records end; `bad` when bytes after them are not a whole record.
    pub end: ScanEnd,
}

/// Scans `file` up to `len`, stepping over damage; `seqs` are the positions it may hold.
pub(super) fn inspect(file: &File, len: u64, seqs: std::ops::Range<u64>) -> io::Result<Inspection> {
    let mut damage = Vec::new();
    let mut records = 0u64;
    let (end, _) = scan_skipping(
        file,
        0,
        len,
        seqs,
        |_, _| {
            records += 1;
            true
        },
        |d| damage.push(d),
    )?;
    Ok(Inspection { records, damage, end })
}

/// What verify found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentCheck {
    pub segment: PathBuf,
    pub records: u64,
    /// Ranges that are not whole records, with whole records after them.
    pub damage: Vec<Damage>,
    /// Bytes at the end with no whole record after them, as (from, to).
    pub tail: Option<(u64, u64)>,
    /// The last segment, the one a server writes: bytes at its end that are not yet a whole
    /// record are a write in progress, or one a crash cut short (never acknowledged, and cut off
    /// at the next start), not damage.
    pub last: bool,
}

impl SegmentCheck {
    pub fn is_damaged(&self) -> bool {
        !self.damage.is_empty() || (self.tail.is_some() && !self.last)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every segment checked, oldest first.
    pub segments: Vec<SegmentCheck>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        !self.segments.iter().any(SegmentCheck::is_damaged)
    }
}

/// Checks every segment of the log in `dir`, without a lock and without writing anything.
pub fn verify(dir: &Path) -> Result<VerifyReport, EventLogError> {
    if !dir.is_dir() {
        return Err(EventLogError::Invalid(format!("{} has no event log", dir.display())));
    }
    let firsts = segment_firsts(dir)?;
    let mut report = VerifyReport::default();
    for (i, first) in firsts.iter().enumerate() {
        let next = firsts.get(i + 1).copied().unwrap_or(u64::MAX);
        let path = dir.join(file_name(*first));
        let file = match File::open(&path) {
            Ok(f) => f,
            // A running server dropped it (retention) since the listing: nothing to check.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        // What is there now: a running server's later appends are left for the next check.
        let len = file.metadata()?.len();
        let found = inspect(&file, len, *first..next)?;
        report.segments.push(SegmentCheck {
            segment: path,
            records: found.records,
            damage: found.damage,
            tail: found.end.bad.map(|_| (found.end.offset, len)),
            last: next == u64::MAX,
        });
    }
    Ok(report)
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let records: u64 = self.segments.iter().map(|s| s.records).sum();
        let damaged: Vec<_> = self.segments.iter().filter(|s| s.is_damaged()).collect();
        let checked = self.segments.len();
        if damaged.is_empty() {
            writeln!(f, "{checked} segment(s) checked, {records} whole record(s): no damage found")?;
        } else {
            writeln!(f, "{checked} segment(s) checked, {records} whole record(s); {} damaged:", damaged.len())?;
        }
        for s in &self.segments {
            for d in &s.damage {
                let from = d.after_seq.map_or_else(|| "the segment's first".to_owned(), |p| (p + 1).to_string());
                writeln!(
                    f,
                    "{}: bytes {}..{} ({} bytes) are damaged ({}): events at positions {from}..{} are unreadable",
                    s.segment.display(),
                    d.start,
                    d.end,
                    d.end - d.start,
                    d.why,
                    d.next_seq
                )?;
            }
            if let Some((from, to)) = s.tail {
                if s.last {
                    writeln!(
                        f,
                        "{}: the last {} bytes are not yet a whole record (a write in progress, or one a crash \
                         cut short: the server cuts it off when it starts)",
                        s.segment.display(),
                        to - from
                    )?;
                } else {
                    writeln!(
                        f,
                        "{}: bytes {from}..{to} at the end ({} bytes) are damaged: no whole record after them",
                        s.segment.display(),
                        to - from
                    )?;
                }
            }
        }
        if !damaged.is_empty() {
            writeln!(
                f,
                "nothing was changed; `fleetgate events repair` (with the server stopped) copies the intact records \
                 into clean segments and keeps the damaged ones aside"
            )?;
        }
        Ok(())
    }
}
