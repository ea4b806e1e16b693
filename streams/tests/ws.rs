//! The WebSocket handshake and byte stream, end to end over an in-memory
//! pipe: the real HTTP parser and WebSocket framing on both sides.

use std::time::Duration;

use edgehub_streams::ws::{self, AcceptError, AMQP, MQTT};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_websockets::Message;

const HEADS: &[&str] = &[MQTT, AMQP];

fn pipe() -> (DuplexStream, DuplexStream) {
    tokio::io::duplex(64 * 1024)
}

async fn raw_request(req: &str) -> (Result<&'static str, AcceptError>, String) {
    let (client, server) = pipe();
    let srv = tokio::spawn(async move { ws::accept(server, HEADS, 1 << 20).await.map(|(_, p)| p) });
    let (mut rd, mut wr) = tokio::io::split(client);
    wr.write_all(req.as_bytes()).await.unwrap();
    let mut response = String::new();
    let r = tokio::time::timeout(Duration::from_secs(5), srv)
        .await
        .unwrap()
        .unwrap();
    drop(wr);
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_string(&mut response)).await;
    (r, response)
}

fn upgrade(protocols: &str) -> String {
    format!(
        "GET /$iothub/websocket?iothub-no-client-cert=true HTTP/1.1\r\nHost: hub\r\n\
         Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {protocols}\r\n\r\n"
    )
}

#[tokio::test]
async fn the_subprotocol_picks_the_head_and_the_accept_key_follows_rfc6455() {
    let (r, response) = raw_request(&upgrade("amqpwsb10")).await;
    assert_eq!(r.unwrap(), AMQP);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    // RFC 6455 §1.3's own example key and answer.
    assert!(
        response.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{response}"
    );
    // Answered in the client's spelling.
    assert!(
        response.contains("sec-websocket-protocol: amqpwsb10"),
        "{response}"
    );

    let (r, _) = raw_request(&upgrade("wamp, mqtt")).await;
    assert_eq!(r.unwrap(), MQTT);
}

#[tokio::test]
async fn refusals_say_why() {
    let (r, response) = raw_request(&upgrade("amqp")).await;
    assert!(
        matches!(r, Err(AcceptError::Refused { status: 400, .. })),
        "{r:?}"
    );
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        response.contains("no supported subprotocol offered"),
        "{response}"
    );
    assert!(response.contains("mqtt, AMQPWSB10"), "{response}");

    let (r, response) =
        raw_request("GET / HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n").await;
    assert!(
        matches!(r, Err(AcceptError::Refused { status: 400, .. })),
        "{r:?}"
    );
    assert!(
        response.contains("only WebSocket upgrades are served here"),
        "{response}"
    );

    let (r, response) = raw_request(&upgrade("mqtt").replace("Version: 13", "Version: 8")).await;
    assert!(
        matches!(r, Err(AcceptError::Refused { status: 426, .. })),
        "{r:?}"
    );
    assert!(response.contains("sec-websocket-version: 13"), "{response}");

    // Not HTTP at all: an MQTT CONNECT sent to the WebSocket port.
    let (r, _) = raw_request("\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00").await;
    assert!(matches!(r, Err(AcceptError::Http(_))), "{r:?}");
}

#[tokio::test]
async fn a_byte_stream_split_anywhere_across_messages_reads_back_whole_and_pings_are_answered() {
    let (client, server) = pipe();
    let srv = tokio::spawn(async move {
        let (mut s, proto) = ws::accept(server, HEADS, 1 << 20).await.unwrap();
        assert_eq!(proto, MQTT);
        let mut got = vec![0u8; 1000];
        s.read_exact(&mut got).await.unwrap();
        // Echo in two writes and one flush: one message.
        s.write_all(&got[..10]).await.unwrap();
        s.write_all(&got[10..]).await.unwrap();
        s.flush().await.unwrap();
        got
    });
    let req = tokio_websockets::ClientBuilder::new()
        .uri("ws://hub/$iothub/websocket")
        .unwrap()
        .add_header(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static("mqtt"),
        )
        .unwrap();
    let (mut c, _) = req.connect_on(client).await.unwrap();
    let sent: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    // 1, 2, 3… bytes per message, with a ping in between.
    let (mut at, mut n) = (0, 1);
    while at < sent.len() {
        let end = (at + n).min(sent.len());
        c.send(Message::binary(sent[at..end].to_vec()))
            .await
            .unwrap();
        if n == 3 {
            c.send(Message::ping("are you there")).await.unwrap();
        }
        at = end;
        n += 1;
    }
    let mut pong = false;
    let mut echoed = Vec::new();
    while echoed.len() < sent.len() {
        let m = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if m.is_pong() {
            assert_eq!(&*m.into_payload(), b"are you there");
            pong = true;
        } else {
            assert!(m.is_binary());
            echoed.extend_from_slice(&m.into_payload());
        }
    }
    assert_eq!(srv.await.unwrap(), sent);
    assert_eq!(echoed, sent);
    assert!(pong, "the ping was not answered");
}

#[tokio::test]
async fn text_messages_and_oversized_messages_end_the_stream_with_an_error() {
    for (msg, max) in [
        (Message::text("CONNECT"), 1 << 20),
        (Message::binary(vec![0u8; 2048]), 1024),
    ] {
        let (client, server) = pipe();
        let srv = tokio::spawn(async move {
            let (mut s, _) = ws::accept(server, HEADS, max).await.unwrap();
            let mut buf = [0u8; 16];
            s.read(&mut buf).await
        });
        let (mut c, _) = tokio_websockets::ClientBuilder::new()
            .uri("ws://hub/")
            .unwrap()
            .add_header(
                http::header::SEC_WEBSOCKET_PROTOCOL,
                http::HeaderValue::from_static("mqtt"),
            )
            .unwrap()
            .connect_on(client)
            .await
            .unwrap();
        c.send(msg).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), srv)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }
}

#[tokio::test]
async fn the_client_side_checks_the_chosen_subprotocol() {
    let (client, server) = pipe();
    let srv = tokio::spawn(async move {
        let (mut s, proto) = ws::accept(server, HEADS, 1 << 20).await.unwrap();
        s.write_all(proto.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut c = ws::connect(client, "wss://hub:443/$iothub/websocket", AMQP)
        .await
        .unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, AMQP);
    srv.await.unwrap();

    let (client, server) = pipe();
    tokio::spawn(async move { ws::accept(server, HEADS, 1 << 20).await.map(|_| ()) });
    let e = ws::connect(client, "ws://hub/", "amqp")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("WebSocket upgrade"), "{e}");
}
