//! `fleetgate events repair`: copies the intact records of damaged segments into clean ones.
//!
//! Readers already step over damage, so nothing here is needed to keep serving; repair makes
//! the log clean again (so the damage stops being reported at every start) without losing a
//! byte: each damaged segment is kept aside, renamed `….events.damaged`, for whoever wants to
//! look at it or restore from it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::segment::{file_name, Damage};
use super::verify::{inspect, Inspection};
use super::{lock, segment_firsts, sync_dir, EventLogError};
use crate::disk;

/// What repair did to one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRepair {
    pub segment: PathBuf,
    /// Where the original is kept.
    pub damaged_copy: PathBuf,
    /// Ranges that were not whole records, with whole records after them.
    pub damage: Vec<Damage>,
    /// Bytes at the end with no whole record after them (a torn write, or damage to the end),
    /// as (from, to).
    pub tail: Option<(u64, u64)>,
    pub records_kept: u64,
    pub bytes_kept: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    pub segments_checked: usize,
    pub repaired: Vec<SegmentRepair>,
}

/// Repairs the log in `dir`: needs the log's lock, so it refuses while a server owns the log.
pub fn repair(dir: &Path) -> Result<RepairReport, EventLogError> {
    if !dir.is_dir() {
        return Err(EventLogError::Invalid(format!("{} has no event log", dir.display())));
    }
    let _lock = lock(dir)?;
    let firsts = segment_firsts(dir)?;
    let mut report = RepairReport { segments_checked: firsts.len(), repaired: Vec::new() };
    for (i, first) in firsts.iter().enumerate() {
        let next = firsts.get(i + 1).copied().unwrap_or(u64::MAX);
        let path = dir.join(file_name(*first));
        if let Some(r) = repair_segment(dir, &path, *first..next)? {
            report.repaired.push(r);
        }
    }
    Ok(report)
}

fn repair_segment(dir: &Path, path: &Path, seqs: std::ops::Range<u64>) -> Result<Option<SegmentRepair>, EventLogError> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let Inspection { records, damage, end } = inspect(&file, len, seqs)?;
    if damage.is_empty() && end.bad.is_none() {
        return Ok(None);
    }
    // The intact bytes: everything up to the end of the last whole record, less the damage.
    let mut keep = Vec::new();
    let mut at = 0;
    for d in &damage {
        keep.push((at, d.start));
        at = d.end;
    }
    keep.push((at, end.offset));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let fresh_path = dir.join(format!("{name}.repair"));
    let mut fresh = disk::private_file().write(true).create(true).truncate(true).open(&fresh_path)?;
    let mut bytes_kept = 0;
    let mut buf = vec![0u8; 1024 * 1024];
    for (from, to) in keep {
        let mut pos = from;
        while pos < to {
            let n = ((to - pos) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], pos)?;
            fresh.write_all(&buf[..n])?;
            pos += n as u64;
        }
        bytes_kept += to - from;
    }
    fresh.sync_all()?;
    drop(fresh);
    // The original gets its second name before the clean copy replaces it (atomically): a crash
    // in between leaves the original in place and a repair to run again, never a missing segment.
    let damaged_copy = free_name(dir, &format!("{name}.damaged"));
    std::fs::hard_link(path, &damaged_copy)?;
    std::fs::rename(&fresh_path, path)?;
    sync_dir(dir)?;
    let tail = end.bad.map(|_| (end.offset, len));
    tracing::warn!(segment = %path.display(), damaged_copy = %damaged_copy.display(), ranges = damage.len(),
        records_kept = records, bytes_kept, "repaired a damaged event log segment");
    Ok(Some(SegmentRepair { segment: path.to_owned(), damaged_copy, damage, tail, records_kept: records, bytes_kept }))
}

/// `dir/name`, or `dir/name.N` for the first N not taken (an earlier repair's copy is kept).
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    (1u32..).map(|n| dir.join(format!("{name}.{n}"))).find(|p| !p.exists()).expect("a free name")
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.repaired.is_empty() {
            return writeln!(f, "{} segment(s) checked: no damage found, nothing changed", self.segments_checked);
        }
        writeln!(f, "{} segment(s) checked, {} repaired:", self.segments_checked, self.repaired.len())?;
        for r in &self.repaired {
            writeln!(f, "{}: kept {} whole record(s), {} bytes", r.segment.display(), r.records_kept, r.bytes_kept)?;
            for d in &r.damage {
                let from = d.after_seq.map_or_else(|| "the segment's first".to_owned(), |s| (s + 1).to_string());
                writeln!(
                    f,
                    "  dropped damaged bytes {}..{} ({} bytes, {}): events at positions {from}..{} lost",
                    d.start,
                    d.end,
                    d.end - d.start,
                    d.why,
                    d.next_seq
                )?;
            }
            if let Some((from, to)) = r.tail {
                writeln!(
                    f,
                    "  dropped bytes {from}..{to} at the end ({} bytes): no whole record after them",
                    to - from
                )?;
            }
            writeln!(f, "  the original is kept as {}", r.damaged_copy.display())?;
        }
        Ok(())
    }
}
