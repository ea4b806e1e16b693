//! Test helpers: the library server on ephemeral loopback ports, and a raw
//! MQTT client built on the codec so tests control every byte.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use edgehub::{Config, Server};
use edgehub_codec::{decode, encode, Connect, Packet, Properties, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub struct TestHub {
    pub addr: SocketAddr,
    pub tls_addr: SocketAddr,
    pub broker: std::sync::Arc<edgehub_broker::Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestHub {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_data_dir(dir.path());
        config.mqtt_listen = Some("127.0.0.1:0".parse().unwrap());
        config.mqtts_listen = "127.0.0.1:0".parse().unwrap();
        config.allow_anonymous = true;
        config.hostname = Some("edgehub-test".into());
        config.management_listen = "127.0.0.1:0".parse().unwrap();
        config.store_min_free_disk = 0;
        tweak(&mut config);
        let server = Server::bind(&config).await.unwrap();
        let addr = server.mqtt_addr().unwrap();
        let tls_addr = server.mqtts_addr().unwrap();
        let broker = server.broker().clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        TestHub {
            addr,
            tls_addr,
            broker,
            stop: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap()).await;
    }
}

pub struct Raw {
    pub stream: TcpStream,
    pub protocol: Protocol,
    buf: BytesMut,
}

pub fn connect_packet(client_id: &str, protocol: Protocol, properties: Properties) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        properties: properties.into(),
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
    }))
}

impl Raw {
    pub async fn open(addr: SocketAddr, protocol: Protocol) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            protocol,
            buf: BytesMut::new(),
        }
    }

    /// Opens and completes CONNECT/CONNACK.
    pub async fn connected(
        addr: SocketAddr,
        client_id: &str,
        protocol: Protocol,
        properties: Properties,
    ) -> Raw {
        let mut r = Raw::open(addr, protocol).await;
        r.send(&connect_packet(client_id, protocol, properties))
            .await;
        match r.recv().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0, "CONNACK refused"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        r
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, self.protocol, &mut out, usize::MAX).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Next packet, or `None` when the hub closed the connection. Panics
    /// after 10 s of silence.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("no packet from the hub within 10 s")
    }

    /// `Err(())` on timeout, `Ok(None)` on close.
    pub async fn recv_within(&mut self, t: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Some(p) = decode(&mut self.buf, self.protocol, usize::MAX).unwrap() {
                return Ok(Some(p));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// True when the hub closes the connection (after any packets) within 10 s.
    pub async fn closed(&mut self) -> bool {
        loop {
            match self.recv_within(Duration::from_secs(10)).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(()) => return false,
            }
        }
    }
}
