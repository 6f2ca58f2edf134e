//! The telemetry stream of the embedded store: an append-only log of segment files.
//!
//! Telemetry is written once, read in order and dropped by age, which is what a log does best
//! (Kafka's and NATS JetStream's file stores have this shape). A batch of events is encoded into
//! one buffer, written with one `pwrite` and made durable with one `fdatasync` before anyone is
//! told its position; a B-tree insert per event, a WAL copy of every touched page and deletes
//! for retention are what the SQLite table it replaces cost.
//!
//! - Positions are global (all hubs) and increase; a record carries its own position and hub.
//! - A segment is `NNNN….events`, named after the lowest position it may hold. A new one is
//!   started when the current one reaches [`EventLogOptions::segment_bytes`] or its first event
//!   is older than an eighth of the retention; whole segments older than the retention are
//!   deleted (never the one being written).
//! - Whole segments past a size cap are deleted too, oldest first, and appends are refused
//!   (retryably: nothing is acknowledged) while the filesystem's free space is below a reserve.
//! - A crash can leave a torn record at the end of the segment being written: the writer cuts it
//!   off when it opens the log. It was never acknowledged (acknowledgement waits for the sync).
//!   Only bytes with no whole record after them, in the last segment, can be that: bytes that
//!   are not a record with whole records after them are damage (a disk error, a stray write),
//!   and readers step over them, reporting the range once, and never cut anything (see
//!   [`segment::scan_skipping`]). [`repair`] copies the intact records into a clean segment;
//!   [`verify`] looks for damage in every segment (readers see only what they read) and changes
//!   nothing.
//! - One process owns the log (an advisory lock on `lock` in its directory).

mod record;
mod repair;
mod segment;
mod verify;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use fleetgate_core::message::ReceivedEvent;

pub use repair::{repair, RepairReport, SegmentRepair};
pub use segment::Damage;
use segment::{file_name, parse_name, scan_skipping, Segment, INDEX_EVERY};
pub use verify::{verify, SegmentCheck, VerifyReport};

use crate::disk;

/// The most bytes one read scans (matching or not), so a reader of a quiet hub among busy ones
/// comes back (with where to continue) instead of reading the whole log in one call.
const MAX_SCAN_BYTES: usize = 8 * 1024 * 1024;
/// How often appends look for segments past the retention.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct EventLogOptions {
    /// Events older than this are dropped, a whole segment at a time (Azure's built-in endpoint
    /// keeps one day by default).
    pub retention: Duration,
    /// A new segment is started past this size.
    pub segment_bytes: u64,
    /// The most bytes the log keeps: past it the oldest whole segments are deleted (never the
    /// one being written). `None`: no cap (the server always sets one, see
    /// [`crate::disk::default_event_cap`]).
    pub max_bytes: Option<u64>,
    /// Appends are refused while the filesystem has less free space than this (0: never).
    pub reserve_bytes: u64,
}

impl Default for EventLogOptions {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: None,
            reserve_bytes: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log: {0}")]
    Io(#[from] io::Error),
    #[error("event log: {0}")]
    Invalid(String),
    /// The filesystem is below its free-space reserve: nothing was written; retry later.
    #[error("event log: {0}")]
    NoSpace(String),
}

/// Events read from the log and where the next read continues.
#[derive(Debug, Default)]
pub struct LogPage {
    pub events: Vec<(u64, ReceivedEvent)>,
    /// The position after the last record looked at: pass it as `from` to continue.
    pub next: u64,
}

pub struct EventLog {
    dir: PathBuf,
    options: EventLogOptions,
    /// `None` when opened read-only.
    writer: Option<Mutex<Writer>>,
    /// Oldest first; the last one is being written.
    segments: RwLock<Vec<Arc<Segment>>>,
    /// Held for the log's life: the advisory lock (`None` when read-only).
    _lock: Option<File>,
}

struct Writer {
    file: File,
    active: Arc<Segment>,
    /// Bytes of the active segment that are written and synced.
    len: u64,
    next_seq: u64,
    /// Offset of the active segment's last index entry.
    last_indexed: Option<u64>,
    /// When the active segment's first event was appended (for rolling by age).
    first_append: Option<Instant>,
    last_sweep: Instant,
    /// A sync failed: what is on disk is unknown, so nothing more is appended until a restart
    /// (which reads back what is really there).
    broken: bool,
    /// Appends are being refused for want of free space (logged when it starts and ends).
    refusing: bool,
    buf: Vec<u8>,
}

impl EventLog {
    /// Opens (or creates) the log in `dir`, cutting off a torn record left by a crash.
    pub fn open(dir: &Path, options: EventLogOptions) -> Result<Self, EventLogError> {
        let lock = lock(dir)?;
        let mut firsts = segment_firsts(dir)?;
        if firsts.is_empty() {
            disk::private_file().write(true).create_new(true).open(dir.join(file_name(1)))?.sync_all()?;
            sync_dir(dir)?;
            firsts.push(1);
        }
        let mut segments = sealed_segments(dir, &firsts)?;
        let first = *firsts.last().expect("at least one segment");
        let (writer, active) = recover(dir, first)?;
        segments.push(active);
        let log = EventLog {
            dir: dir.to_owned(),
            options,
            writer: Some(Mutex::new(writer)),
            segments: RwLock::new(segments),
            _lock: Some(lock),
        };
        log.sweep()?;
        Ok(log)
    }

    /// Opens the log for reading beside the process that owns it (a tool, a test): takes no
    /// lock, changes nothing, and reads up to the last whole record as of now.
    pub fn open_read_only(dir: &Path) -> Result<Self, EventLogError> {
        let firsts = segment_firsts(dir)?;
        let Some(&last) = firsts.last() else {
            return Err(EventLogError::Invalid(format!("{} has no event log", dir.display())));
        };
        let mut segments = sealed_segments(dir, &firsts)?;
        let path = dir.join(file_name(last));
        let file = File::open(&path)?;
        // Up to the last whole record: one being written is left to its writer.
        let tail = read_tail(&path, &file, last)?;
        let active = Segment::active(path, last, tail.end.offset, tail.next_seq, tail.index)?;
        report_damage(&active, &tail.damage);
        segments.push(Arc::new(active));
        Ok(EventLog {
            dir: dir.to_owned(),
            options: EventLogOptions::default(),
            writer: None,
            segments: RwLock::new(segments),
            _lock: None,
        })
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Writer>, EventLogError> {
        let w = self.writer.as_ref().ok_or_else(|| EventLogError::Invalid("opened read-only".into()))?;
        Ok(w.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Appends `events` durably; returns their positions.
    pub fn append(&self, events: &[ReceivedEvent]) -> Result<Vec<u64>, EventLogError> {
        let mut w = self.writer()?;
        let first = w.next_seq;
        let seqs: Vec<u64> = (first..first + events.len() as u64).collect();
        self.write(&mut w, events.iter().zip(seqs.iter().copied()))?;
        Ok(seqs)
    }

    /// Appends events that already have positions (higher than any in the log, increasing):
    /// for moving an older store's events into the log.
    pub fn import(&self, events: &[(u64, ReceivedEvent)]) -> Result<(), EventLogError> {
        let mut w = self.writer()?;
        let mut last = w.next_seq.saturating_sub(1);
        for (seq, _) in events {
            if *seq <= last {
                return Err(EventLogError::Invalid(format!("position {seq} is not after {last}")));
            }
            last = *seq;
        }
        self.write(&mut w, events.iter().map(|(seq, e)| (e, *seq)))
    }

    fn write<'a>(
        &self,
        w: &mut Writer,
        events: impl Iterator<Item = (&'a ReceivedEvent, u64)>,
    ) -> Result<(), EventLogError> {
        if w.broken {
            return Err(EventLogError::Invalid("an earlier sync failed; restart to recover the log".into()));
        }
        self.check_space(w)?;
        self.maybe_roll(w)?;
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        let mut new_index = Vec::new();
        let mut last_indexed = w.last_indexed;
        let mut end_seq = w.next_seq;
        for (event, seq) in events {
            let offset = w.len + buf.len() as u64;
            if last_indexed.is_none_or(|last| offset >= last + INDEX_EVERY) {
                new_index.push((seq, offset));
                last_indexed = Some(offset);
            }
            record::encode(seq, event, &mut buf).map_err(|e| EventLogError::Invalid(e.into()))?;
            end_seq = seq + 1;
        }
        if buf.is_empty() {
            w.buf = buf;
            return Ok(());
        }
        if let Err(e) = w.file.write_all_at(&buf, w.len) {
            // Nothing of this batch counts; cut back what reached the file.
            let _ = w.file.set_len(w.len);
            return Err(e.into());
        }
        if let Err(e) = w.file.sync_data() {
            w.broken = true;
            tracing::error!(error = %e, "syncing the event log failed; telemetry is refused until a restart");
            return Err(e.into());
        }
        w.len += buf.len() as u64;
        w.next_seq = end_seq;
        w.last_indexed = last_indexed;
        w.first_append.get_or_insert_with(Instant::now);
        w.active.publish(w.len, end_seq, &new_index);
        fleetgate_metrics::METRICS.event_log_bytes.inc_by(buf.len() as i64);
        // Keep a normal batch's buffer for the next one, not a huge one.
        if buf.capacity() <= 4 * 1024 * 1024 {
            w.buf = buf;
        }
        Ok(())
    }

    /// Starts a new segment when the active one is full or old enough, and drops expired ones.
    fn maybe_roll(&self, w: &mut Writer) -> Result<(), EventLogError> {
        let roll_age = self.options.retention / 8;
        let full = w.len >= self.options.segment_bytes;
        let old = w.first_append.is_some_and(|t| t.elapsed() >= roll_age);
        if full || old {
            // Everything in the active segment is synced already (each append syncs).
            let path = self.dir.join(file_name(w.next_seq));
            // Not `create_new`: a roll that failed after creating the file (at the directory
            // sync) left it empty, and the retry must be able to use it.
            let file = disk::private_file().read(true).write(true).create(true).truncate(false).open(&path)?;
            sync_dir(&self.dir)?;
            let active = Arc::new(Segment::active(path, w.next_seq, 0, w.next_seq, Vec::new())?);
            self.segments.write().unwrap_or_else(|p| p.into_inner()).push(active.clone());
            *w = Writer {
                file,
                active,
                len: 0,
                next_seq: w.next_seq,
                last_indexed: None,
                first_append: None,
                last_sweep: w.last_sweep,
                broken: false,
                refusing: w.refusing,
                buf: std::mem::take(&mut w.buf),
            };
        }
        if full || old || w.last_sweep.elapsed() >= SWEEP_EVERY {
            w.last_sweep = Instant::now();
            self.sweep()?;
        }
        Ok(())
    }

    /// Refuses the append while the filesystem is below the free-space reserve: the device gets
    /// no acknowledgement and sends again later, instead of the disk filling up under the
    /// registry.
    fn check_space(&self, w: &mut Writer) -> Result<(), EventLogError> {
        if self.options.reserve_bytes == 0 {
            return Ok(());
        }
        // Not knowing is no reason to refuse: a write to a full disk fails by itself.
        let Ok(space) = disk::space(&self.dir) else { return Ok(()) };
        let free = space.free;
        let low = free < self.options.reserve_bytes;
        if low != w.refusing {
            w.refusing = low;
            if low {
                tracing::error!(dir = %self.dir.display(), free_bytes = free, reserve_bytes = self.options.reserve_bytes,
                    "free disk space is below the reserve: telemetry is refused (devices get no acknowledgement and retry) until space is freed");
            } else {
                tracing::info!(dir = %self.dir.display(), free_bytes = free, "free disk space is above the reserve again: telemetry is accepted");
            }
        }
        if low {
            fleetgate_metrics::METRICS.disk_reserve_refusal("telemetry");
            return Err(EventLogError::NoSpace(format!(
                "{} has {free} bytes free, below the reserve of {} bytes",
                self.dir.display(),
                self.options.reserve_bytes
            )));
        }
        Ok(())
    }

    /// Deletes the oldest segments whose last write is past the retention, then the oldest
    /// while the log is over its size cap (never the segment being written).
    fn sweep(&self) -> Result<(), EventLogError> {
        let cutoff = SystemTime::now().checked_sub(self.options.retention).unwrap_or(SystemTime::UNIX_EPOCH);
        loop {
            let (expired, total) = {
                let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
                let total: u64 = segments.iter().map(|s| s.committed()).sum();
                let expired = match segments.first() {
                    Some(s) if segments.len() > 1 => {
                        let modified = std::fs::metadata(&s.path)?.modified()?;
                        if modified < cutoff {
                            Some((s.clone(), "age"))
                        } else if self.options.max_bytes.is_some_and(|max| total > max) {
                            Some((s.clone(), "size"))
                        } else {
                            None
                        }
                    }
                    _ => None,
                };
                (expired, total)
            };
            let Some((expired, reason)) = expired else {
                fleetgate_metrics::METRICS.event_log_bytes.set(total as i64);
                return Ok(());
            };
            self.segments.write().unwrap_or_else(|p| p.into_inner()).retain(|s| !Arc::ptr_eq(s, &expired));
            // Readers that hold the segment keep reading their open file.
            std::fs::remove_file(&expired.path)?;
            fleetgate_metrics::METRICS.segment_dropped(reason);
            if reason == "age" {
                tracing::info!(segment = %expired.path.display(), "dropped telemetry past the retention");
            } else {
                tracing::warn!(segment = %expired.path.display(), segment_bytes = expired.committed(),
                    log_bytes = total, max_bytes = self.options.max_bytes.unwrap_or_default(),
                    "dropped the oldest telemetry: the event log is over its size cap (--event-retention-bytes)");
            }
        }
    }

    /// Events of hub `hub` (any case) from position `from` on, at most `limit`, oldest first.
    pub fn read(&self, hub: &str, from: u64, limit: usize) -> Result<LogPage, EventLogError> {
        let segments = self.segments.read().unwrap_or_else(|p| p.into_inner()).clone();
        let key = hub.to_ascii_lowercase();
        let mut page = LogPage { events: Vec::new(), next: from };
        // Events before the oldest segment are gone: continue from there.
        if let Some(oldest) = segments.first() {
            page.next = page.next.max(oldest.first_seq);
        }
        let start = segments.partition_point(|s| s.first_seq <= page.next).saturating_sub(1);
        let mut scanned = 0usize;
        let mut failed = None;
        for s in &segments[start..] {
            if s.end_seq() <= page.next {
                continue;
            }
            let offset = s.start_offset(page.next)?;
            let mut stop = false;
            s.read(offset, |r, _| {
                if r.seq < page.next {
                    return true;
                }
                if r.hub_key == key.as_bytes() {
                    match r.to_event(hub) {
                        Ok(e) => page.events.push((r.seq, e)),
                        Err(why) => {
                            failed = Some(format!("{}: position {}: {why}", s.path.display(), r.seq));
                            stop = true;
                            return false;
                        }
                    }
                }
                page.next = r.seq + 1;
                scanned += r.body.len() + r.bag.len() + 64;
                stop = page.events.len() >= limit || scanned >= MAX_SCAN_BYTES;
                !stop
            })?;
            if stop {
                break;
            }
        }
        match failed {
            Some(why) => Err(EventLogError::Invalid(why)),
            None => Ok(page),
        }
    }

    /// The newest position in the log (any hub); 0 when nothing was ever appended.
    pub fn last_seq(&self) -> u64 {
        let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
        segments.last().map_or(0, |s| s.end_seq().saturating_sub(1))
    }
}

/// The first positions of the segment files in `dir`, ascending.
fn segment_firsts(dir: &Path) -> io::Result<Vec<u64>> {
    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        if let Some(first) = entry?.file_name().to_str().and_then(parse_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Every segment but the last (the one being written), each ending where the next begins.
fn sealed_segments(dir: &Path, firsts: &[u64]) -> io::Result<Vec<Arc<Segment>>> {
    firsts.windows(2).map(|p| Ok(Arc::new(Segment::sealed(dir.join(file_name(p[0])), p[0], p[1])?))).collect()
}

/// Takes the log's advisory lock in `dir` (created owner-only), or says who holds it.
fn lock(dir: &Path) -> Result<File, EventLogError> {
    disk::create_private_dir(dir)?;
    let lock = disk::private_file().create(true).truncate(false).write(true).open(dir.join("lock"))?;
    if lock.try_lock().is_err() {
        return Err(EventLogError::Invalid(format!(
            "{} is in use by another process (is the server running?)",
            dir.display()
        )));
    }
    Ok(lock)
}

/// Reports damage found while opening (once: the segment will not report it again).
fn report_damage(segment: &Segment, damage: &[Damage]) {
    for d in damage {
        d.report(&segment.path);
    }
    segment.reported(damage.iter().map(|d| d.start));
}

/// What a scan of the segment being written found.
struct Tail {
    /// Where the whole records end; `bad` when bytes after them are not a whole record and
    /// nothing whole follows (a torn tail).
    end: segment::ScanEnd,
    next_seq: u64,
    index: Vec<(u64, u64)>,
    /// Damaged ranges with whole records after them.
    damage: Vec<Damage>,
}

/// Scans the segment being written: where its whole records end, the position after them, its
/// index and its damaged ranges. Positions must increase (and not be below the segment's first).
fn read_tail(path: &Path, file: &File, first_seq: u64) -> Result<Tail, EventLogError> {
    let (mut index, mut last, mut misordered) = (Vec::<(u64, u64)>::new(), None::<u64>, None);
    let mut damage = Vec::new();
    let visit = |r: &record::RecordRef<'_>, offset: u64| {
        if r.seq < first_seq || last.is_some_and(|l| r.seq <= l) {
            misordered = Some((r.seq, offset));
            return false;
        }
        if index.last().is_none_or(|(_, at)| offset >= at + INDEX_EVERY) {
            index.push((r.seq, offset));
        }
        last = Some(r.seq);
        true
    };
    let (end, _) = scan_skipping(file, 0, file.metadata()?.len(), first_seq..u64::MAX, visit, |d| damage.push(d))?;
    if let Some((seq, offset)) = misordered {
        return Err(EventLogError::Invalid(format!(
            "{}: position {seq} at byte {offset} is out of order",
            path.display()
        )));
    }
    Ok(Tail { end, next_seq: last.map_or(first_seq, |l| l + 1), index, damage })
}

/// Reads the segment being written and cuts off a torn tail (never acknowledged: acknowledgement
/// waits for the sync).
fn recover(dir: &Path, first_seq: u64) -> Result<(Writer, Arc<Segment>), EventLogError> {
    let path = dir.join(file_name(first_seq));
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let Tail { end, next_seq, index, damage } = read_tail(&path, &file, first_seq)?;
    if let Some(why) = end.bad {
        // Nothing whole after these bytes, in the last segment: the write a crash cut short.
        let len = file.metadata()?.len();
        tracing::warn!(segment = %path.display(), from_byte = end.offset, to_byte = len,
            dropped_bytes = len - end.offset, reason = why,
            "cut off a torn write at the end of the event log (no whole record follows it: an unacknowledged write cut short by a crash)");
        file.set_len(end.offset)?;
        file.sync_all()?;
    }
    let active = Segment::active(path, first_seq, end.offset, next_seq, index.clone())?;
    report_damage(&active, &damage);
    let active = Arc::new(active);
    let writer = Writer {
        file,
        active: active.clone(),
        len: end.offset,
        next_seq,
        last_indexed: index.last().map(|(_, at)| *at),
        // Its age is unknown: count from now.
        first_append: (end.offset > 0).then(Instant::now),
        last_sweep: Instant::now(),
        broken: false,
        refusing: false,
        buf: Vec::new(),
    };
    Ok((writer, active))
}

/// Makes a created or removed file name durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
