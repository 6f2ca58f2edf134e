//! One segment file of the event log: records in increasing position, a sparse index of where
//! positions start, and how much of the file is whole and durable.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::record::{decode, DecodeError, RecordRef, HEADER};

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
        let end = scan(&self.file, 0, self.committed(), |r, offset| {
            if index.last().is_none_or(|(_, last)| offset >= last + INDEX_EVERY) {
                index.push((r.seq, offset));
            }
            true
        })?;
        if let Some(why) = end.bad {
            return Err(corrupt(&self.path, end.offset, why));
        }
        Ok(index)
    }

    /// Scans the committed records from `offset`; a record that is not whole is an error here.
    pub fn read(&self, offset: u64, visit: impl FnMut(&RecordRef<'_>, u64) -> bool) -> io::Result<u64> {
        let end = scan(&self.file, offset, self.committed(), visit)?;
        match end.bad {
            Some(why) => Err(corrupt(&self.path, end.offset, why)),
            None => Ok(end.offset),
        }
    }
}

pub fn corrupt(path: &Path, offset: u64, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: at byte {offset}: {why}", path.display()))
}
