//! One segment file of the event log: records in increasing position, a sparse index of where
//! positions start, and how much of the file is whole and durable.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::record::{decode, plausible, DecodeError, RecordRef, HEADER, MIN_RECORD};

/// An index entry (position, file offset) is kept about every this many bytes.
pub const INDEX_EVERY: u64 = 64 * 1024;
/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 256 * 1024;
const SUFFIX: &str = ".events";

pub struct Segment {
    /// No record in the segment has a lower position (the file is named after it).
    pub first_seq: u64,
    pub path: PathBuf,
    /// For reading (`pread`), shared by every reader; stays valid if the file is deleted.
    file: File,
    /// Bytes of whole records that are on disk: readers never look past it.
    committed: AtomicU64,
    /// Position after the last committed record; `first_seq` while empty.
    end_seq: AtomicU64,
    /// (position, offset) pairs, ascending. `None` until built: a segment found on disk is
    /// indexed on its first read, not at startup.
    index: Mutex<Option<Vec<(u64, u64)>>>,
    /// Start offsets of the damaged ranges already reported, so each is logged and counted once
    /// however often readers step over it.
    reported: Mutex<Vec<u64>>,
}

pub fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SUFFIX}")
}

/// The first position a segment file's name gives, if it is a segment file.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// Where a scan stopped.
#[derive(Debug, PartialEq, Eq)]
pub struct ScanEnd {
    /// Offset after the last record visited.
    pub offset: u64,
    /// Set when the bytes at `offset` (before the scan's end) are not a whole record.
    pub bad: Option<&'static str>,
}

/// Bytes of a segment that are not whole records, with whole records after them (or, in a
/// segment that is no longer written, up to its end): damage on disk, not a torn write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub start: u64,
    pub end: u64,
    pub why: &'static str,
    /// The position of the last whole record before the range, if any.
    pub after_seq: Option<u64>,
    /// The position of the first whole record after it (or the next segment's first).
    pub next_seq: u64,
}

impl Damage {
    /// Logs the damage loudly, naming the file, the byte range and the positions lost, and
    /// counts it.
    pub fn report(&self, path: &Path) {
        let lost_from = self.after_seq.map_or_else(|| "the segment's first".to_owned(), |s| (s + 1).to_string());
        tracing::error!(
            segment = %path.display(),
            from_byte = self.start,
            to_byte = self.end,
            damaged_bytes = self.end - self.start,
            reason = self.why,
            "the event log is damaged: bytes {}..{} of {} are not whole records; the events at positions {}..{} \
             (those not readable) are lost, every whole record around them is kept; run `fleetgate events repair` \
             with the server stopped to copy the intact records into a clean segment",
            self.start,
            self.end,
            path.display(),
            lost_from,
            self.next_seq,
        );
        fleetgate_metrics::METRICS.event_log_damaged_ranges.inc();
        fleetgate_metrics::METRICS.event_log_damaged_bytes.inc_by(self.end - self.start);
    }
}

/// The offset of the first whole record at or after `from` (and before `end`) whose position is
/// in `seqs`, if any: where reading resumes past damaged bytes. A false match would need bytes
/// that carry a length in bounds, a position in range and a matching CRC-32 all by chance.
pub fn find_next_record(file: &File, from: u64, end: u64, seqs: std::ops::Range<u64>) -> io::Result<Option<u64>> {
    // A window of candidate offsets, plus enough bytes after it to check each candidate's
    // length and position without another read.
    let mut buf = vec![0u8; READ_CHUNK + HEADER + 8];
    let mut spare = Vec::new();
    let mut base = from;
    while end.saturating_sub(base) >= MIN_RECORD as u64 {
        let want = (end - base).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..want], base)?;
        let candidates = want.min(READ_CHUNK);
        for pos in 0..candidates {
            let at = base + pos as u64;
            let Some(total) = plausible(&buf[pos..want], &seqs) else { continue };
            if at + total as u64 > end {
                continue;
            }
            let bytes = if pos + total <= want {
                &buf[pos..pos + total]
            } else {
                spare.resize(total, 0);
                file.read_exact_at(&mut spare, at)?;
                &spare[..]
            };
            if decode(bytes).is_ok() {
                return Ok(Some(at));
            }
        }
        base += candidates as u64;
    }
    Ok(None)
}

/// Where the record at `at` would end, by its length field, if a whole record (at a position
/// in `seqs`) starts there.
fn whole_record_after(file: &File, at: u64, end: u64, seqs: &std::ops::Range<u64>) -> io::Result<Option<u64>> {
    let mut len = [0u8; 4];
    if end.saturating_sub(at) < 4 {
        return Ok(None);
    }
    file.read_exact_at(&mut len, at)?;
    let next = at + (HEADER as u64) + u64::from(u32::from_le_bytes(len));
    if next <= at || end.saturating_sub(next) < MIN_RECORD as u64 {
        return Ok(None);
    }
    let mut head = [0u8; HEADER + 8];
    file.read_exact_at(&mut head, next)?;
    let Some(total) = plausible(&head, seqs) else { return Ok(None) };
    if next + total as u64 > end {
        return Ok(None);
    }
    let mut record = vec![0u8; total];
    file.read_exact_at(&mut record, next)?;
    Ok(decode(&record).is_ok().then_some(next))
}

/// [`scan`] that steps over damaged ranges: when bytes are not a whole record and a whole record
/// (at a later position, below `seqs_end`) follows, `damaged` is told and the scan goes on from
/// there. The end says `bad` only when nothing whole follows the bad bytes (a torn tail, or
/// damage up to the end).
pub fn scan_skipping(
    file: &File,
    mut offset: u64,
    end: u64,
    seqs: std::ops::Range<u64>,
    mut visit: impl FnMut(&RecordRef<'_>, u64) -> bool,
    mut damaged: impl FnMut(Damage),
) -> io::Result<(ScanEnd, Option<u64>)> {
    let mut last: Option<u64> = None;
    loop {
        let scanned = scan(file, offset, end, |r, at| {
            last = Some(r.seq);
            visit(r, at)
        })?;
        let Some(why) = scanned.bad else { return Ok((scanned, last)) };
        let from = last.map_or(seqs.start, |l| l.saturating_add(1));
        // A file cut short under the log (a stray truncation) ends before `end`: the search
        // stops at its real end, so what is missing is damage like any other, never a failed read.
        let end = end.min(file.metadata()?.len());
        // Damage inside a record (its length intact) ends where the record ends: look there
        // first. That loses one record, and never reads a record-shaped body (a device's
        // message can hold any bytes) as a record; only damage to a length needs the search.
        let next = match whole_record_after(file, scanned.offset, end, &(from..seqs.end))? {
            Some(at) => Some(at),
            None => find_next_record(file, scanned.offset + 1, end, from..seqs.end)?,
        };
        match next {
            Some(next) => {
                let mut head = [0u8; HEADER + 8];
                file.read_exact_at(&mut head, next)?;
                let next_seq = u64::from_le_bytes(head[HEADER..].try_into().expect("8 bytes"));
                damaged(Damage { start: scanned.offset, end: next, why, after_seq: last, next_seq });
                offset = next;
            }
            None => return Ok((scanned, last)),
        }
    }
}

/// Calls `visit` with each whole record in `file` from `offset` up to `end`, and its offset,
/// until `visit` returns false or a record is not whole.
pub fn scan(
    file: &File,
    mut offset: u64,
    end: u64,
    mut visit: impl FnMut(&RecordRef<'_>, u64) -> bool,
) -> io::Result<ScanEnd> {
    let mut buf = vec![0u8; READ_CHUNK.min((end.saturating_sub(offset)) as usize).max(HEADER)];
    // buf[..filled] holds the file from `offset` on.
    let mut filled = 0usize;
    loop {
        let mut pos = 0usize;
        loop {
            match decode(&buf[pos..filled]) {
                Ok((record, n)) => {
                    if !visit(&record, offset + pos as u64) {
                        return Ok(ScanEnd { offset: offset + (pos + n) as u64, bad: None });
                    }
                    pos += n;
                }
                Err(DecodeError::Incomplete { needed }) => {
                    // Keep the partial record, read more behind it.
                    buf.copy_within(pos..filled, 0);
                    offset += pos as u64;
                    filled -= pos;
                    if buf.len() < needed {
                        buf.resize(needed, 0);
                    }
                    break;
                }
                Err(DecodeError::Corrupt(why)) => return Ok(ScanEnd { offset: offset + pos as u64, bad: Some(why) }),
            }
        }
        let available = end.saturating_sub(offset + filled as u64);
        if available == 0 {
            let bad = (filled > 0).then_some("the last record is incomplete");
            return Ok(ScanEnd { offset, bad });
        }
        let want = (buf.len() - filled).min(available as usize);
        let n = file.read_at(&mut buf[filled..filled + want], offset + filled as u64)?;
        if n == 0 {
            return Ok(ScanEnd { offset, bad: Some("the file is shorter than expected") });
        }
        filled += n;
    }
}

impl Segment {
    /// A segment from disk that is no longer written: all of it is whole and durable (a segment
    /// is synced before the next is created). `end_seq` is the next segment's first position.
    pub fn sealed(path: PathBuf, first_seq: u64, end_seq: u64) -> io::Result<Segment> {
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        Ok(Segment {
            first_seq,
            path,
            file,
            committed: AtomicU64::new(len),
            end_seq: AtomicU64::new(end_seq),
            index: Mutex::new(None),
            reported: Mutex::new(Vec::new()),
        })
    }

    /// The segment being written, with what is already in it.
    pub fn active(
        path: PathBuf,
        first_seq: u64,
        len: u64,
        end_seq: u64,
        index: Vec<(u64, u64)>,
    ) -> io::Result<Segment> {
        Ok(Segment {
            first_seq,
            file: File::open(&path)?,
            path,
            committed: AtomicU64::new(len),
            end_seq: AtomicU64::new(end_seq),
            index: Mutex::new(Some(index)),
            reported: Mutex::new(Vec::new()),
        })
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    pub fn end_seq(&self) -> u64 {
        self.end_seq.load(Ordering::Acquire)
    }

    /// Makes records up to `len` visible to readers, once they are on disk.
    pub fn publish(&self, len: u64, end_seq: u64, new_index: &[(u64, u64)]) {
        if !new_index.is_empty() {
            let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(index) = index.as_mut() {
                index.extend_from_slice(new_index);
            }
        }
        self.end_seq.store(end_seq, Ordering::Release);
        self.committed.store(len, Ordering::Release);
    }

    /// Offset of a record at or before position `from` (the start when none is indexed).
    pub fn start_offset(&self, from: u64) -> io::Result<u64> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if index.is_none() {
            *index = Some(self.build_index()?);
        }
        let index = index.as_ref().expect("built above");
        let i = index.partition_point(|(seq, _)| *seq <= from);
        Ok(if i == 0 { 0 } else { index[i - 1].1 })
    }

    fn build_index(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut index: Vec<(u64, u64)> = Vec::new();
        self.read(0, |r, offset| {
            if index.last().is_none_or(|(_, last)| offset >= last + INDEX_EVERY) {
                index.push((r.seq, offset));
            }
            true
        })?;
        Ok(index)
    }

    /// Scans the committed records from `offset`, stepping over damaged ranges (each reported
    /// once). Everything below `committed` was synced, so bytes there that are not whole records
    /// are damage, never a torn write, and are never cut off here.
    pub fn read(&self, offset: u64, visit: impl FnMut(&RecordRef<'_>, u64) -> bool) -> io::Result<u64> {
        let committed = self.committed();
        let seqs = self.first_seq..self.end_seq().max(self.first_seq + 1);
        let (end, last) = scan_skipping(&self.file, offset, committed, seqs, visit, |d| self.report(d))?;
        if let Some(why) = end.bad {
            // Nothing whole up to the end of what is committed.
            self.report(Damage { start: end.offset, end: committed, why, after_seq: last, next_seq: self.end_seq() });
            return Ok(committed);
        }
        Ok(end.offset)
    }

    fn report(&self, damage: Damage) {
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        if !reported.contains(&damage.start) {
            reported.push(damage.start);
            damage.report(&self.path);
        }
    }

    /// Marks damage found when the segment was opened as reported already.
    pub fn reported(&self, starts: impl IntoIterator<Item = u64>) {
        self.reported.lock().unwrap_or_else(|p| p.into_inner()).extend(starts);
    }
}
