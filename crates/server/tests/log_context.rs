//! What a connection logs carries the connection's context: the client's address, the protocol
//! and, once CONNECT has named it, the client, without each line spelling them out.

mod common;

use common::TestServer;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};

// The test's runtime has one thread, so the server's tasks log to the subscriber set here.
#[tokio::test(flavor = "current_thread")]
async fn hub_session_lines_carry_the_address_protocol_and_client_id() {
    let (logs, _default) = common::capture_logs();
    let s = TestServer::start().await;
    let key = s.create_device("dev-span").await;

    // A CONNECT refused before authentication: named by the client id it claimed.
    let mut m = s.mqtt().await;
    let local = m.stream.get_ref().0.local_addr().unwrap();
    let token = fleetgate_core::sas::build_token(&key, &format!("{}/devices/dev-span", s.hub()), 9_999_999_999, None);
    match m
        .connect("not-dev-span", &format!("{}/dev-span/?api-version=2019-10-01", s.hub()), Some(&token), false, 60)
        .await
    {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::BadClientId),
        other => panic!("{other:?}"),
    }
    let refused = logs.line_with("refused hub CONNECT");
    assert!(refused.contains(&format!("remote_addr={local}")), "{refused}");
    assert!(refused.contains("protocol=\"mqtt\""), "{refused}");
    assert!(refused.contains("client_id=not-dev-span"), "{refused}");

    // A session's lines name its device through the span too.
    let mut m = s.hub_device("dev-span", &key).await.unwrap();
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
    let connected = logs.line_with("device connected");
    assert!(connected.contains("connection{remote_addr="), "{connected}");
    assert!(connected.contains("client_id=dev-span}"), "{connected}");
}
