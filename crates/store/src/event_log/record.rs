//! One telemetry event on disk: a length, a CRC-32 of the payload, and the payload.
//!
//! ```text
//! u32 payload length | u32 CRC-32 (IEEE) of the payload | payload
//! payload: u64 seq | i64 enqueued ticks | u16 hub key length | hub key
//!          | u16 device id length | device id | u32 bag length | bag
//!          | [u16 extension length | extension] | body (the rest)
//! extension: u8 auth method | generation id (the rest)
//! ```
//! All integers little-endian. The CRC tells a record torn by a crash (or damaged on disk) from a
//! whole one; the explicit `seq` makes every record self-describing when a segment is scanned.
//!
//! The extension (how the sender authenticated) came later: it is there when the top bit of the
//! bag length is set ([`EXTENDED`]; a bag is far below 2 GiB), so records written before it are
//! read as they were, without one. New fields go at the end of the extension, which a reader
//! that does not know them skips by its length.

use fleetgate_core::message::{AuthMethod, ConnectionAuth, ReceivedEvent};
use fleetgate_core::time::Timestamp;

pub const HEADER: usize = 8;
/// Fixed part of the payload: seq, ticks, and the three lengths.
const FIXED: usize = 8 + 8 + 2 + 2 + 4;
/// The smallest whole record.
pub const MIN_RECORD: usize = HEADER + FIXED;
/// Largest payload accepted when reading: a message is at most 256 KiB plus its names and bag.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Set in the bag length of a record that has an extension after its bag.
const EXTENDED: u32 = 1 << 31;

/// The stored code of each authentication method (never reused).
fn method_code(m: AuthMethod) -> u8 {
    match m {
        AuthMethod::Sas => 1,
        AuthMethod::X509SelfSigned => 2,
        AuthMethod::X509Ca => 3,
        AuthMethod::HubPolicy => 4,
    }
}

fn method_of(code: u8) -> Option<AuthMethod> {
    match code {
        1 => Some(AuthMethod::Sas),
        2 => Some(AuthMethod::X509SelfSigned),
        3 => Some(AuthMethod::X509Ca),
        4 => Some(AuthMethod::HubPolicy),
        _ => None,
    }
}

/// Why bytes are not a whole record.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record needs: the end of what was written (or a torn write).
    Incomplete { needed: usize },
    /// A length out of bounds or a checksum mismatch.
    Corrupt(&'static str),
}

/// Appends the record of `event` at position `seq` to `out`. Fails (writing nothing) when a
/// field does not fit its length prefix.
pub fn encode(seq: u64, event: &ReceivedEvent, out: &mut Vec<u8>) -> Result<(), &'static str> {
    // The hub is stored as its key (ASCII lower case), like every other table keys hubs.
    let (hub, device, bag) = (event.hub.as_bytes(), event.device_id.as_bytes(), event.bag.as_bytes());
    let hub_len = u16::try_from(hub.len()).map_err(|_| "hub name too long")?;
    let device_len = u16::try_from(device.len()).map_err(|_| "device id too long")?;
    let bag_len = u32::try_from(bag.len()).ok().filter(|l| l & EXTENDED == 0).ok_or("property bag too long")?;
    let extension = event.connection.as_ref().map(|c| {
        let mut x = vec![method_code(c.method)];
        x.extend_from_slice(c.generation_id.as_bytes());
        x
    });
    let extension_len = match &extension {
        Some(x) => Some(u16::try_from(x.len()).map_err(|_| "generation id too long")?),
        None => None,
    };
    let extra = extension.as_ref().map_or(0, |x| 2 + x.len());
    let len = FIXED + hub.len() + device.len() + bag.len() + extra + event.body.len();
    if len > MAX_PAYLOAD {
        return Err("event too large");
    }
    let start = out.len();
    out.reserve(HEADER + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // the CRC, filled in below
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&event.enqueued_time.ticks().to_le_bytes());
    out.extend_from_slice(&hub_len.to_le_bytes());
    out.extend(hub.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(&device_len.to_le_bytes());
    out.extend_from_slice(device);
    let flag = if extension.is_some() { EXTENDED } else { 0 };
    out.extend_from_slice(&(bag_len | flag).to_le_bytes());
    out.extend_from_slice(bag);
    if let (Some(x), Some(n)) = (&extension, extension_len) {
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(x);
    }
    out.extend_from_slice(&event.body);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A record read back, borrowing the buffer it was read from.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub ticks: i64,
    pub hub_key: &'a [u8],
    pub device: &'a [u8],
    pub bag: &'a [u8],
    /// The extension after the bag, if the record has one (see the module's layout).
    pub extension: Option<&'a [u8]>,
    pub body: &'a [u8],
}

impl RecordRef<'_> {
    /// The event, with `hub` as the name it is read under. Fails on text that is not UTF-8
    /// (which [`encode`] never writes).
    pub fn to_event(&self, hub: &str) -> Result<ReceivedEvent, &'static str> {
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| "text field is not UTF-8");
        Ok(ReceivedEvent {
            hub: hub.to_owned(),
            device_id: text(self.device)?,
            enqueued_time: Timestamp::from_ticks(self.ticks),
            bag: text(self.bag)?,
            connection: self.connection()?,
            body: self.body.to_vec(),
        })
    }

    /// How the sender authenticated, from the extension; `None` for a record without one.
    fn connection(&self) -> Result<Option<ConnectionAuth>, &'static str> {
        let Some(x) = self.extension else { return Ok(None) };
        let Some((&code, generation)) = x.split_first() else { return Ok(None) };
        // A method this version does not know (written by a newer one) is left out, not an error.
        let Some(method) = method_of(code) else { return Ok(None) };
        let generation_id = String::from_utf8(generation.to_vec()).map_err(|_| "text field is not UTF-8")?;
        Ok(Some(ConnectionAuth { method, generation_id }))
    }
}

/// Whether the bytes at the start of `buf` could begin a record at a position in `seqs`: a cheap
/// test (length in bounds, position in range) before the checksum is computed. `buf` must hold
/// at least `HEADER + 8` bytes; `None` when it does not.
pub fn plausible(buf: &[u8], seqs: &std::ops::Range<u64>) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().expect("4 bytes")) as usize;
    let seq = u64::from_le_bytes(buf.get(HEADER..HEADER + 8)?.try_into().expect("8 bytes"));
    ((FIXED..=MAX_PAYLOAD).contains(&len) && seqs.contains(&seq)).then_some(HEADER + len)
}

/// The record at the start of `buf` and its total size.
pub fn decode(buf: &[u8]) -> Result<(RecordRef<'_>, usize), DecodeError> {
    if buf.len() < HEADER {
        return Err(DecodeError::Incomplete { needed: HEADER });
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if !(FIXED..=MAX_PAYLOAD).contains(&len) {
        return Err(DecodeError::Corrupt("record length out of bounds"));
    }
    let total = HEADER + len;
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let p = &buf[HEADER..total];
    if crc32fast::hash(p) != crc {
        return Err(DecodeError::Corrupt("record checksum mismatch"));
    }
    let mut at = 0;
    let mut take = |n: usize| -> Result<&[u8], DecodeError> {
        let s = p.get(at..at + n).ok_or(DecodeError::Corrupt("field runs past the record"))?;
        at += n;
        Ok(s)
    };
    let seq = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
    let ticks = i64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
    let hub_len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
    let hub_key = take(hub_len)?;
    let device_len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
    let device = take(device_len)?;
    let bag_len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    let bag = take((bag_len & !EXTENDED) as usize)?;
    let extension = if bag_len & EXTENDED != 0 {
        let n = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        Some(take(n)?)
    } else {
        None
    };
    let body = &p[at..];
    Ok((RecordRef { seq, ticks, hub_key, device, bag, extension, body }, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &[u8]) -> ReceivedEvent {
        ReceivedEvent {
            hub: "Hub.Example".into(),
            device_id: "dev-1".into(),
            enqueued_time: Timestamp::from_ticks(17_000_000_001_234_567),
            bag: "%24.mid=1&a=b".into(),
            connection: Some(ConnectionAuth { method: AuthMethod::Sas, generation_id: "638000000000000001".into() }),
            body: body.to_vec(),
        }
    }

    /// Encodes `event` in the layout written before records had an extension.
    fn encode_v1(seq: u64, event: &ReceivedEvent) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&seq.to_le_bytes());
        p.extend_from_slice(&event.enqueued_time.ticks().to_le_bytes());
        p.extend_from_slice(&(event.hub.len() as u16).to_le_bytes());
        p.extend(event.hub.bytes().map(|b| b.to_ascii_lowercase()));
        p.extend_from_slice(&(event.device_id.len() as u16).to_le_bytes());
        p.extend_from_slice(event.device_id.as_bytes());
        p.extend_from_slice(&(event.bag.len() as u32).to_le_bytes());
        p.extend_from_slice(event.bag.as_bytes());
        p.extend_from_slice(&event.body);
        let mut out = (p.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Issue 14 item 17: the connection's authentication is stored with each event, and records
    /// written before it was still read (without it).
    #[test]
    fn the_connection_is_stored_and_older_records_still_read() {
        for method in [AuthMethod::Sas, AuthMethod::X509SelfSigned, AuthMethod::X509Ca, AuthMethod::HubPolicy] {
            let mut e = event(b"{}");
            e.connection = Some(ConnectionAuth { method, generation_id: "6380".into() });
            let mut buf = Vec::new();
            encode(3, &e, &mut buf).unwrap();
            let (r, n) = decode(&buf).unwrap();
            assert_eq!((n, r.bag, r.body), (buf.len(), &b"%24.mid=1&a=b"[..], &b"{}"[..]));
            assert_eq!(r.to_event("Hub.Example").unwrap(), e);
        }
        let mut old = event(b"{\"t\":1}");
        old.connection = None;
        let buf = encode_v1(9, &old);
        let (r, n) = decode(&buf).unwrap();
        assert_eq!((r.seq, n, r.extension), (9, buf.len(), None));
        assert_eq!(r.to_event("Hub.Example").unwrap(), old);
        // Without a connection, a record is written as before.
        let mut buf2 = Vec::new();
        encode(9, &old, &mut buf2).unwrap();
        assert_eq!(buf2, buf);
        // A method code from a newer version reads as unknown, not as damage.
        let mut e = event(b"");
        e.connection = Some(ConnectionAuth { method: AuthMethod::Sas, generation_id: "1".into() });
        let mut buf = Vec::new();
        encode(4, &e, &mut buf).unwrap();
        let at = buf.len() - 2; // the method code, before the one-byte generation id
        buf[at] = 200;
        let crc = crc32fast::hash(&buf[HEADER..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf).unwrap().0.to_event("h").unwrap().connection, None);
    }

    #[test]
    fn round_trips_and_folds_the_hub_name() {
        let mut buf = Vec::new();
        encode(7, &event(b"{\"t\":1}"), &mut buf).unwrap();
        encode(8, &event(b""), &mut buf).unwrap();
        let (r, n) = decode(&buf).unwrap();
        assert_eq!((r.seq, r.hub_key, r.device, r.body), (7, &b"hub.example"[..], &b"dev-1"[..], &b"{\"t\":1}"[..]));
        assert_eq!(r.to_event("Hub.Example").unwrap(), event(b"{\"t\":1}"));
        let (r2, n2) = decode(&buf[n..]).unwrap();
        assert_eq!((r2.seq, r2.body.len(), n + n2), (8, 0, buf.len()));
    }

    #[test]
    fn a_torn_record_is_incomplete_and_a_damaged_one_corrupt() {
        let mut buf = Vec::new();
        encode(1, &event(b"hello"), &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(matches!(decode(&buf[..cut]), Err(DecodeError::Incomplete { .. })), "cut at {cut}");
        }
        for i in HEADER..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad).unwrap_err(), DecodeError::Corrupt("record checksum mismatch"), "byte {i}");
        }
        let mut huge = buf.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge).unwrap_err(), DecodeError::Corrupt("record length out of bounds"));
    }

    /// Whatever is on disk, decoding answers (a record, incomplete or corrupt) without panicking,
    /// also when the checksum happens to match (here: made to match).
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(&buf);
            if len >= HEADER + FIXED {
                let payload = (len - HEADER) as u32;
                buf[0..4].copy_from_slice(&payload.to_le_bytes());
                let crc = crc32fast::hash(&buf[HEADER..]);
                buf[4..8].copy_from_slice(&crc.to_le_bytes());
                if let Ok((r, n)) = decode(&buf) {
                    assert_eq!(n, len);
                    let _ = r.to_event("h");
                }
            }
        }
    }

    #[test]
    fn lengths_inside_the_payload_are_checked() {
        // A whole record (checksum right) whose hub length points past its end.
        let mut buf = Vec::new();
        encode(1, &event(b""), &mut buf).unwrap();
        buf[HEADER + 16..HEADER + 18].copy_from_slice(&u16::MAX.to_le_bytes());
        let crc = crc32fast::hash(&buf[HEADER..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf).unwrap_err(), DecodeError::Corrupt("field runs past the record"));
    }
}
