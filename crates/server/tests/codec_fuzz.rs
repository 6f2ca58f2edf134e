//! Random bytes through the MQTT framing we rely on: it must reject, never panic or over-read.

use bytes::BytesMut;
use proptest::prelude::*;
use rumqttc::mqttbytes::v4::Packet;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        // Drain as many packets as parse; stop at the first error.
        while !buf.is_empty() {
            match Packet::read(&mut buf, 96 * 1024) {
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    #[test]
    fn packet_shaped_bytes_never_panic(kind in 0u8..16, flags in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut data = vec![(kind << 4) | flags, body.len() as u8 & 0x7f];
        data.extend_from_slice(&body);
        let mut buf = BytesMut::from(&data[..]);
        let _ = Packet::read(&mut buf, 96 * 1024);
    }
}
