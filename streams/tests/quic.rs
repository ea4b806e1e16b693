//! A QUIC stream as a byte stream over real loopback UDP, with the
//! transport settings the hub and its clients use.

use std::sync::Arc;
use std::time::Duration;

use edgehub_streams::quic;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pair() -> (rustls::ServerConfig, rustls::ClientConfig) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, client)
}

#[tokio::test]
async fn bytes_cross_both_ways_and_the_last_write_arrives_after_the_stream_is_dropped() {
    let (server_tls, client_tls) = pair();
    let server = quinn::Endpoint::server(
        quic::server_config(server_tls).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        assert_eq!(
            conn.handshake_data()
                .unwrap()
                .downcast::<quinn::crypto::rustls::HandshakeData>()
                .unwrap()
                .protocol
                .as_deref(),
            Some(quic::ALPN)
        );
        let (send, recv) = conn.accept_bi().await.unwrap();
        let mut s = quic::QuicStream::new(conn, send, recv);
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(b"bye").await.unwrap();
        // Dropped straight after the write: the peer must still get it.
        drop(s);
        got
    });
    let client = quic::client_endpoint(client_tls).unwrap();
    let mut c = quic::connect(&client, addr, "localhost").await.unwrap();
    // Larger than the stream window: flow control has to turn over.
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&sent).await.unwrap();
    let mut bye = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut bye))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bye, b"bye");
    assert_eq!(srv.await.unwrap(), sent);
}

#[tokio::test]
async fn a_client_without_the_mqtt_alpn_is_refused() {
    let (server_tls, mut client_tls) = pair();
    let server = quinn::Endpoint::server(
        quic::server_config(server_tls).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(i) = server.accept().await {
            let _ = i.await;
        }
    });
    client_tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect(addr, "localhost").unwrap(),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("peer doesn't support any known protocol"),
        "{e}"
    );
}
