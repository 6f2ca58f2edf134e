//! The telemetry event log: reads by hub and position across segments, recovery after a crash
//! cut a write short, retention, and one owner at a time.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use fleetgate_core::message::ReceivedEvent;
use fleetgate_core::time::Timestamp;
use fleetgate_store::event_log::{EventLog, EventLogOptions};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "fg-event-log-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn event(hub: &str, device: &str, n: usize, body_len: usize) -> ReceivedEvent {
    ReceivedEvent {
        hub: hub.into(),
        device_id: device.into(),
        enqueued_time: Timestamp::from_ticks(17_000_000_000_000_000 + n as i64),
        bag: format!("%24.mid={n}&k=v"),
        body: format!("{n:08}").into_bytes().into_iter().cycle().take(body_len.max(8)).collect(),
    }
}

fn small_segments() -> EventLogOptions {
    EventLogOptions { segment_bytes: 200 * 1024, ..EventLogOptions::default() }
}

fn segment_files(dir: &PathBuf) -> Vec<PathBuf> {
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
    let dir = temp_dir("reads");
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
    let dir = temp_dir("torn");
    let log = EventLog::open(&dir, EventLogOptions::default()).unwrap();
    log.append(&(1..=10).map(|n| event("h", "d", n, 100)).collect::<Vec<_>>()).unwrap();
    drop(log);
    let file = segment_files(&dir).pop().unwrap();
    let whole = std::fs::metadata(&file).unwrap().len();
    // Half of another record (as if the crash came during its write), then garbage.
    let mut torn = Vec::new();
    let probe_dir = temp_dir("torn-probe");
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

/// A damaged byte in the middle of a sealed segment is an error for a reader (not silently
/// skipped); a damaged record at the end of the segment being written is cut off like a torn one.
#[test]
fn damage_is_reported_not_skipped() {
    let dir = temp_dir("damage");
    let log = EventLog::open(&dir, small_segments()).unwrap();
    for n in 0..40 {
        log.append(&[event("h", "d", n, 10_000)]).unwrap();
    }
    drop(log);
    let files = segment_files(&dir);
    assert!(files.len() >= 2);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&files[0], &bytes).unwrap();
    let log = EventLog::open(&dir, small_segments()).unwrap();
    let err = log.read("h", 0, 100).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    // Positions in later segments still read.
    let later = log.read("h", 40, 100).unwrap();
    assert_eq!(later.events.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [40]);
}

/// Whole segments older than the retention are deleted; readers continue from the oldest
/// position left; the segment being written is never deleted.
#[test]
fn segments_past_the_retention_are_dropped() {
    let dir = temp_dir("retention");
    let options = EventLogOptions { retention: Duration::from_secs(3600), segment_bytes: 64 * 1024 };
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
    let log = EventLog::open(&dir, EventLogOptions { retention: Duration::from_secs(3600), segment_bytes: 64 * 1024 })
        .unwrap();
    assert_eq!(segment_files(&dir).len(), 1);
    assert_eq!(log.append(&[event("h", "d", 99, 8)]).unwrap(), [31]);
}

#[test]
fn one_owner_at_a_time_and_positions_only_increase() {
    let dir = temp_dir("owner");
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
    let dir = temp_dir("read-only");
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
    let dir = temp_dir("roll-retry");
    let log = EventLog::open(&dir, EventLogOptions { segment_bytes: 1024, ..EventLogOptions::default() }).unwrap();
    log.append(&[event("h", "d", 1, 2000)]).unwrap(); // the segment is full now
    let next = log.last_seq() + 1;
    std::fs::File::create(dir.join(format!("{next:020}.events"))).unwrap();
    assert_eq!(log.append(&[event("h", "d", 2, 8)]).unwrap(), [next]);
    assert_eq!(segment_files(&dir).len(), 2);
    assert_eq!(log.read("h", 0, 10).unwrap().events.len(), 2);
}
