//! The telemetry event log: reads by hub and position across segments, recovery after a crash
//! cut a write short, retention, and one owner at a time.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use fleetgate_core::message::ReceivedEvent;
use fleetgate_core::time::Timestamp;
use fleetgate_metrics::METRICS;
mod common;
use common::TempPath;
use fleetgate_store::event_log::{repair, verify, EventLog, EventLogError, EventLogOptions};

/// A fresh directory for the log (which creates it), removed when the test ends.
fn log_dir() -> TempPath {
    TempPath::file("log")
}

fn event(hub: &str, device: &str, n: usize, body_len: usize) -> ReceivedEvent {
    ReceivedEvent {
        hub: hub.into(),
        device_id: device.into(),
        enqueued_time: Timestamp::from_ticks(17_000_000_000_000_000 + n as i64),
        bag: format!("%24.mid={n}&k=v"),
        connection: None,
        body: format!("{n:08}").into_bytes().into_iter().cycle().take(body_len.max(8)).collect(),
    }
}

fn small_segments() -> EventLogOptions {
    EventLogOptions { segment_bytes: 200 * 1024, ..EventLogOptions::default() }
}

fn segment_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "events"))
        .collect();
    v.sort();
    v
}

/// Every read, from every position, returns exactly the hub's events at or after it, in order,
/// across several segments, and says where to continue.
#[test]
fn reads_by_hub_and_position_across_segments() {
    let dir = log_dir();
    let options = EventLogOptions { segment_bytes: 64 * 1024, ..EventLogOptions::default() };
    let log = EventLog::open(&dir, options.clone()).unwrap();
    let hubs = ["a.example", "B.example", "c.example"];
    let mut model: Vec<(u64, String, Vec<u8>)> = Vec::new();
    let mut n = 0;
    for batch in 0..60 {
        let events: Vec<ReceivedEvent> = (0..(batch % 7) + 1)
            .map(|i| {
                n += 1;
                // Hub c only now and then: a quiet hub among busy ones.
                let hub = if n % 50 == 0 { hubs[2] } else { hubs[(n + i) % 2] };
                event(hub, &format!("dev-{}", n % 5), n, 200 + (n * 37) % 3000)
            })
            .collect();
        let seqs = log.append(&events).unwrap();
        for (seq, e) in seqs.iter().zip(&events) {
            model.push((*seq, e.hub.to_ascii_lowercase(), e.body.clone()));
        }
    }
    assert!(segment_files(&dir).len() >= 3, "the test should span segments: {:?}", segment_files(&dir));
    let last = model.last().unwrap().0;
    assert_eq!(log.last_seq(), last);
    for hub in hubs {
        for from in (0..=last + 2).step_by(3) {
            let want: Vec<_> = model.iter().filter(|(s, h, _)| *s >= from && *h == hub.to_ascii_lowercase()).collect();
            // Read it all in pages of 5, following `next`.
            let (mut got, mut pos) = (Vec::new(), from);
            loop {
                let page = log.read(&hub.to_uppercase(), pos, 5).unwrap();
                assert!(page.next >= pos, "next went back");
                if page.next == pos {
                    break;
                }
                for (seq, e) in &page.events {
                    assert_eq!(e.hub, hub.to_uppercase(), "read back under the name asked for");
                    got.push((*seq, e.body.clone()));
                }
                pos = page.next;
            }
            let want: Vec<_> = want.into_iter().map(|(s, _, b)| (*s, b.clone())).collect();
            assert_eq!(got, want, "hub {hub} from {from}");
        }
    }
    // Reopened, the same.
    drop(log);
    let log = EventLog::open(&dir, options).unwrap();
    assert_eq!(log.last_seq(), last);
    let all: usize = model.iter().filter(|(_, h, _)| h == "a.example").count();
    assert_eq!(log.read("a.example", 0, usize::MAX).unwrap().events.len(), all);
    assert_eq!(log.append(&[event("a.example", "d", 0, 8)]).unwrap(), [last + 1]);
}

/// A write cut short by a crash leaves part of a record at the end of the segment: opening the
/// log cuts it off, keeps everything before it, and appends continue at the right position.
#[test]
fn a_torn_write_at_the_end_is_cut_off_on_open() {
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    log.append(&(1..=10).map(|n| event("h", "d", n, 100)).collect::<Vec<_>>()).unwrap();
    drop(log);
    let file = segment_files(&dir).pop().unwrap();
    let whole = std::fs::metadata(&file).unwrap().len();
    // Half of another record (as if the crash came during its write), then garbage.
    let mut torn = Vec::new();
    let probe_dir = log_dir();
    let probe = EventLog::open(&probe_dir, EventLogOptions::default()).unwrap();
    probe.append(&[event("h", "d", 11, 100)]).unwrap();
    let record = std::fs::read(segment_files(&probe_dir).pop().unwrap()).unwrap();
    torn.extend_from_slice(&record[..record.len() / 2]);
    for cut in [torn.len(), 3] {
        let mut bytes = std::fs::read(&file).unwrap();
        bytes.truncate(whole as usize);
        bytes.extend_from_slice(&torn[..cut]);
        std::fs::write(&file, &bytes).unwrap();
        let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), whole, "cut back to the last whole record");
        assert_eq!(log.last_seq(), 10);
        assert_eq!(log.read("h", 0, 100).unwrap().events.len(), 10);
    }
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    assert_eq!(log.append(&[event("h", "d", 11, 100)]).unwrap(), [11]);
    let page = log.read("H", 0, 100).unwrap();
    assert_eq!(page.events.len(), 11);
    assert_eq!(page.events[10].1.body, event("h", "d", 11, 100).body);
}

/// A damaged byte in the middle of a sealed segment: readers step over the damaged record and
/// read every whole one around it (no error, nothing truncated); later segments read as before.
#[test]
fn damage_in_a_sealed_segment_is_stepped_over() {
    let dir = log_dir();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    for n in 0..40 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    drop(log);
    let files = segment_files(&dir);
    assert!(files.len() >= 2);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[100] ^= 0xff; // inside the first record
    std::fs::write(&files[0], &bytes).unwrap();
    let ranges = METRICS.event_log_damaged_ranges.get();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    let seqs: Vec<u64> = log.read("h", 0, 100).unwrap().events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (2..=40).collect::<Vec<_>>(), "all but the damaged first record");
    assert!(METRICS.event_log_damaged_ranges.get() > ranges, "counted");
    assert_eq!(std::fs::read(&files[0]).unwrap(), bytes, "the damaged segment is left as it is");
    let later = log.read("h", 40, 100).unwrap();
    assert_eq!(later.events.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [40]);
}

/// The reproduction, scaled down: 8 bytes overwritten in the middle of the segment being
/// written. That is damage, not a torn write (whole records follow it): opening for writing keeps
/// the file whole, every record but the damaged one reads back, appends go on after the last.
#[test]
fn damage_in_the_middle_of_the_last_segment_keeps_every_intact_record() {
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    for batch in 0..20 {
        log.append(&(0..100).map(|i| event("h", "d", batch * 100 + i, 500)).collect::<Vec<_>>()).unwrap();
    }
    assert_eq!(log.last_seq(), 2000);
    drop(log);
    let file = segment_files(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 8].copy_from_slice(&[0x5a; 8]);
    std::fs::write(&file, &bytes).unwrap();

    let reader = EventLog::open_read_only(&dir).unwrap();
    assert_eq!(reader.last_seq(), 2000, "a reader beside the owner sees past the damage too");
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), bytes.len() as u64, "nothing cut off");
    assert_eq!(log.last_seq(), 2000);
    let seqs: Vec<u64> = log.read("h", 0, usize::MAX).unwrap().events.iter().map(|(s, _)| *s).collect();
    assert!(seqs.len() >= 1998, "at most the record(s) the 8 bytes touch are lost: {} read", seqs.len());
    assert_eq!(seqs.last(), Some(&2000));
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(log.append(&[event("h", "d", 9, 8)]).unwrap(), [2001]);
    assert_eq!(log.read("h", 2001, 10).unwrap().events.len(), 1);
    drop(log);
    // And again after the append: still nothing lost.
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    assert_eq!(log.read("h", 0, usize::MAX).unwrap().events.len(), seqs.len() + 1);
}

/// Other shapes of damage with whole records after them: a record length pointing past the end
/// of the file (looks like a torn record until the records after it are seen), and a page of
/// zeros. Neither is cut off; every other record reads.
#[test]
fn a_bad_length_or_a_zeroed_page_is_stepped_over() {
    for (name, damage) in [("length", 0usize), ("zeros", 1)] {
        let dir = log_dir();
        let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
        let n = 300;
        log.append(&(1..=n).map(|i| event("h", "d", i, 200)).collect::<Vec<_>>()).unwrap();
        drop(log);
        let file = segment_files(&dir).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let record = bytes.len() / n; // all records are the same size
        let at = record * 100; // the start of record 101
        if damage == 0 {
            bytes[at..at + 4].copy_from_slice(&(1024u32 * 1024).to_le_bytes());
        } else {
            bytes[at - 1000..at + 3096].fill(0);
        }
        std::fs::write(&file, &bytes).unwrap();
        let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), bytes.len() as u64, "{name}: nothing cut off");
        let seqs: Vec<u64> = log.read("h", 0, usize::MAX).unwrap().events.iter().map(|(s, _)| *s).collect();
        let lost = n - seqs.len();
        assert!((1..=20).contains(&lost), "{name}: {lost} lost");
        assert_eq!(seqs.last(), Some(&(n as u64)), "{name}");
        assert_eq!(log.append(&[event("h", "d", 0, 8)]).unwrap(), [n as u64 + 1], "{name}");
    }
}

/// `repair` copies the intact records into a clean segment, keeps the damaged one aside and says
/// what it dropped; it refuses while the log is open, and a clean log is left alone.
#[test]
fn repair_keeps_the_intact_records_and_the_damaged_original() {
    let dir = log_dir();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    for n in 1..=40 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    let err = repair(&dir).unwrap_err().to_string();
    assert!(err.contains("in use"), "refused while the log is open: {err}");
    drop(log);
    assert!(repair(&dir).unwrap().repaired.is_empty(), "nothing to repair");
    let files = segment_files(&dir);
    let (first, last) = (files[0].clone(), files.last().unwrap().clone());
    let original = std::fs::read(&first).unwrap();
    let mut bytes = original.clone();
    bytes[10_100] ^= 0xff; // the second record
    std::fs::write(&first, &bytes).unwrap();
    // And a torn write at the end of the last segment.
    let mut tail = std::fs::read(&last).unwrap();
    let whole_tail = tail.len();
    tail.extend_from_slice(&original[..500]);
    std::fs::write(&last, &tail).unwrap();

    let report = repair(&dir).unwrap();
    assert_eq!(report.repaired.len(), 2, "{report}");
    let r = &report.repaired[0];
    assert_eq!((r.segment.clone(), r.damage.len()), (first.clone(), 1));
    assert_eq!((r.damage[0].after_seq, r.damage[0].next_seq), (Some(1), 3), "{report}");
    assert_eq!(std::fs::read(&r.damaged_copy).unwrap(), bytes, "the original is kept aside");
    assert!(r.damaged_copy.to_str().unwrap().ends_with(".events.damaged"));
    assert_eq!(std::fs::metadata(&first).unwrap().len(), r.bytes_kept);
    assert_eq!(report.repaired[1].tail, Some((whole_tail as u64, tail.len() as u64)));
    let text = report.to_string();
    assert!(text.contains("positions 2..3") && text.contains(".damaged"), "{text}");

    let damaged = METRICS.event_log_damaged_ranges.get();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    let seqs: Vec<u64> = log.read("h", 0, 100).unwrap().events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [1].into_iter().chain(3..=40).collect::<Vec<_>>());
    assert_eq!(METRICS.event_log_damaged_ranges.get(), damaged, "the repaired log reads clean");
    assert_eq!(segment_files(&dir), files, "the damaged copy is not read as a segment");
}

/// A sealed segment cut short while the log is open (a stray truncation): reads step over the
/// missing records, as over any damage, instead of failing.
#[test]
fn a_sealed_segment_cut_short_under_an_open_log_is_stepped_over() {
    let dir = log_dir();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    for n in 1..=40 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    let first = segment_files(&dir)[0].clone();
    let in_first = verify(&dir).unwrap().segments[0].records; // positions 1..=in_first
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&first, &bytes[..bytes.len() - 100]).unwrap();
    let ranges = METRICS.event_log_damaged_ranges.get();
    let seqs: Vec<u64> = log.read("h", 0, 100).unwrap().events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=40).filter(|s| *s != in_first).collect::<Vec<_>>(), "all but the cut record");
    assert!(METRICS.event_log_damaged_ranges.get() > ranges, "reported");
}

/// `verify` reads every segment while the log is open (as beside a running server), finds damage
/// in a sealed segment no reader asked for, takes an unfinished record at the end of the last
/// segment for a write in progress (not damage), and changes nothing.
#[test]
fn verify_finds_damage_in_sealed_segments_and_changes_nothing() {
    let dir = log_dir();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    for n in 1..=40 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    let clean = verify(&dir).unwrap();
    assert!(clean.is_clean(), "{clean}");
    assert_eq!(clean.segments.iter().map(|s| s.records).sum::<u64>(), 40);
    assert!(clean.to_string().contains("no damage found"), "{clean}");
    let files = segment_files(&dir);
    assert!(files.len() >= 2);
    let (first, last) = (files[0].clone(), files.last().unwrap().clone());
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[10_100] ^= 0xff; // the second record
    std::fs::write(&first, &bytes).unwrap();
    let mut tail = std::fs::read(&last).unwrap();
    let whole = tail.len() as u64;
    tail.extend_from_slice(&bytes[..500]);
    std::fs::write(&last, &tail).unwrap();
    let contents = |dir: &std::path::Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = contents(&dir);

    let report = verify(&dir).unwrap();
    assert!(!report.is_clean(), "{report}");
    let damaged: Vec<_> = report.segments.iter().filter(|s| s.is_damaged()).collect();
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!((damaged[0].segment.clone(), damaged[0].damage.len()), (first, 1));
    assert_eq!((damaged[0].damage[0].after_seq, damaged[0].damage[0].next_seq), (Some(1), 3));
    let newest = report.segments.last().unwrap();
    assert_eq!((newest.segment.clone(), newest.last, newest.tail), (last, true, Some((whole, tail.len() as u64))));
    let text = report.to_string();
    assert!(text.contains("positions 2..3") && text.contains("not yet a whole record"), "{text}");
    assert_eq!(contents(&dir), before, "nothing changed");
    drop(log);
}

/// Past the size cap the oldest whole segments are deleted (never the one being written), and
/// readers continue from the oldest position left.
#[test]
fn segments_over_the_size_cap_are_dropped_oldest_first() {
    let dir = log_dir();
    let options =
        EventLogOptions { segment_bytes: 64 * 1024, max_bytes: Some(200 * 1024), ..EventLogOptions::default() };
    let log = EventLog::open(&dir, options).unwrap();
    for n in 1..=100 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    let total: u64 = segment_files(&dir).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    assert!(total <= 200 * 1024 + 64 * 1024 + 11_000, "{total} bytes kept");
    let page = log.read("h", 0, 1000).unwrap();
    let first_left: u64 = segment_files(&dir)[0].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(first_left > 50, "the oldest went first");
    assert_eq!(page.events.first().map(|(s, _)| *s), Some(first_left));
    assert_eq!(page.events.last().map(|(s, _)| *s), Some(100));
    assert!(METRICS.render().contains("fleetgate_event_log_dropped_segments_total{reason=\"size\"}"));
}

/// Below the free-space reserve an append is refused as `NoSpace` (retryable) and writes nothing.
#[test]
fn appends_are_refused_below_the_free_space_reserve() {
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions { reserve_bytes: 1, ..EventLogOptions::default() }).unwrap();
    assert_eq!(log.append(&[event("h", "d", 1, 8)]).unwrap(), [1]);
    drop(log);
    let len = std::fs::metadata(segment_files(&dir).pop().unwrap()).unwrap().len();
    let log = EventLog::open(&dir, EventLogOptions { reserve_bytes: u64::MAX, ..EventLogOptions::default() }).unwrap();
    let err = log.append(&[event("h", "d", 2, 8)]).unwrap_err();
    assert!(matches!(err, EventLogError::NoSpace(_)), "{err}");
    assert_eq!(log.last_seq(), 1);
    assert_eq!(std::fs::metadata(segment_files(&dir).pop().unwrap()).unwrap().len(), len, "nothing written");
}

/// The log's directory and files are owner-only.
#[test]
fn files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions { segment_bytes: 1024, ..EventLogOptions::default() }).unwrap();
    log.append(&[event("h", "d", 1, 2000)]).unwrap();
    log.append(&[event("h", "d", 2, 8)]).unwrap(); // rolls
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// Whole segments older than the retention are deleted; readers continue from the oldest
/// position left; the segment being written is never deleted.
#[test]
fn segments_past_the_retention_are_dropped() {
    let dir = log_dir();
    let options = EventLogOptions {
        retention: Duration::from_secs(3600),
        segment_bytes: 64 * 1024,
        ..EventLogOptions::default()
    };
    let log = EventLog::open(&dir, options.clone()).unwrap();
    for n in 0..30 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    let before = segment_files(&dir);
    assert!(before.len() >= 4, "{before:?}");
    drop(log);
    // All but the last two segments last written two hours ago.
    let old = SystemTime::now() - Duration::from_secs(7200);
    for f in &before[..before.len() - 2] {
        std::fs::File::options().write(true).open(f).unwrap().set_modified(old).unwrap();
    }
    let options_1h = options.clone();
    let log = EventLog::open(&dir, options).unwrap();
    let after = segment_files(&dir);
    assert_eq!(after, before[before.len() - 2..], "expired segments dropped on open");
    let page = log.read("h", 0, 1000).unwrap();
    let first_left: u64 = after[0].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(page.events.first().map(|(s, _)| *s), Some(first_left));
    assert_eq!(page.events.last().map(|(s, _)| *s), Some(30));
    // Even when everything is old, the segment being written stays and positions go on.
    for f in &after {
        std::fs::File::options().write(true).open(f).unwrap().set_modified(old).unwrap();
    }
    drop(log);
    let log = EventLog::open(&dir, options_1h).unwrap();
    assert_eq!(segment_files(&dir).len(), 1);
    assert_eq!(log.append(&[event("h", "d", 99, 8)]).unwrap(), [31]);
}

#[test]
fn one_owner_at_a_time_and_positions_only_increase() {
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    let err = EventLog::open(&dir, EventLogOptions::default()).err().expect("a second owner is refused").to_string();
    assert!(err.contains("in use"), "{err}");
    log.import(&[(5, event("h", "d", 5, 8)), (9, event("h", "d", 9, 8))]).unwrap();
    assert!(log.import(&[(9, event("h", "d", 9, 8))]).is_err(), "a position not after the last is refused");
    assert!(log.import(&[(12, event("h", "d", 12, 8)), (11, event("h", "d", 11, 8))]).is_err());
    assert_eq!(log.append(&[event("h", "d", 10, 8)]).unwrap(), [10]);
    let seqs: Vec<u64> = log.read("h", 0, 10).unwrap().events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [5, 9, 10]);
    drop(log);
    EventLog::open(&dir, EventLogOptions::default()).expect("the lock goes with its owner");
}

/// A reader beside the owner (a tool, the crash test) sees the whole records written so far,
/// stops before a record still being written, and cannot append.
#[test]
fn read_only_beside_the_owner() {
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    log.append(&(1..=3).map(|n| event("h", "d", n, 50)).collect::<Vec<_>>()).unwrap();
    // Half a record at the end, as if a write were under way.
    let file = segment_files(&dir).pop().unwrap();
    let whole = std::fs::read(&file).unwrap();
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&whole[..whole.len() / 3 / 2]);
    std::fs::write(&file, &bytes).unwrap();
    let reader = EventLog::open_read_only(&dir).unwrap();
    assert_eq!(reader.last_seq(), 3);
    let seqs: Vec<u64> = reader.read("h", 0, 10).unwrap().events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(reader.append(&[event("h", "d", 4, 8)]).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "the reader changed nothing");
}

/// A roll that failed after creating the next segment's file (say, at the directory sync) left
/// it empty; the next append uses it instead of failing for ever.
#[test]
fn a_roll_retried_after_a_failure_reuses_the_empty_file() {
    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions { segment_bytes: 1024, ..EventLogOptions::default() }).unwrap();
    log.append(&[event("h", "d", 1, 2000)]).unwrap(); // the segment is full now
    let next = log.last_seq() + 1;
    std::fs::File::create(dir.join(format!("{next:020}.events"))).unwrap();
    assert_eq!(log.append(&[event("h", "d", 2, 8)]).unwrap(), [next]);
    assert_eq!(segment_files(&dir).len(), 2);
    assert_eq!(log.read("h", 0, 10).unwrap().events.len(), 2);
}

/// A device's message can hold any bytes, also a whole record naming another device. Damage in
/// that message's record is stepped over to where the record ends (its length is intact), so the
/// record-shaped body is never read as an event.
#[test]
fn a_record_shaped_body_in_a_damaged_record_is_not_read_as_a_record() {
    let probe_dir = log_dir();
    let probe = EventLog::open(&probe_dir, EventLogOptions::default()).unwrap();
    probe.import(&[(2, event("h", "intruder", 2, 8))]).unwrap();
    let forged = std::fs::read(segment_files(&probe_dir).pop().unwrap()).unwrap();

    let dir = log_dir();
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    let mut carrier = event("h", "d", 2, 8);
    carrier.body = [vec![0u8; 64], forged].concat();
    log.append(&[event("h", "d", 1, 100), carrier, event("h", "d", 3, 100)]).unwrap();
    drop(log);
    let file = segment_files(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    // The carrier's body starts after record 1 and the carrier's header and fields; damage one of
    // its leading zeros.
    let zeros = bytes.windows(64).position(|w| w.iter().all(|b| *b == 0)).unwrap();
    bytes[zeros + 10] = 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    let events = log.read("h", 0, 10).unwrap().events;
    let got: Vec<(u64, &str)> = events.iter().map(|(s, e)| (*s, e.device_id.as_str())).collect();
    assert_eq!(got, [(1, "d"), (3, "d")]);
}
