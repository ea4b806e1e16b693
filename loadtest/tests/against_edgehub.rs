//! The load generator against a real edgehub on loopback (TCP and TLS with
//! the generated CA), and against a port where nothing listens.

use std::time::Duration;

use edgehub::{Config, Server};
use edgehub_loadtest::{run, LoadConfig, Target};

/// Every listener on an ephemeral loopback port, no disk floor.
fn loopback_config(dir: &std::path::Path) -> Config {
    let mut c = Config::for_data_dir(dir);
    c.management_listen = "127.0.0.1:0".parse().unwrap();
    c.mqtts_listen = "127.0.0.1:0".parse().unwrap();
    c.store_min_free_disk = 0;
    c
}

async fn hub() -> (
    tempfile::TempDir,
    std::net::SocketAddr,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = loopback_config(dir.path());
    c.mqtt_listen = Some("127.0.0.1:0".parse().unwrap());
    c.allow_anonymous = true;
    let server = Server::bind(&c).await.unwrap();
    let (plain, tls) = (server.mqtt_addr().unwrap(), server.mqtts_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    (dir, plain, tls, tx)
}

fn small(target: Target) -> LoadConfig {
    let mut cfg = LoadConfig::new(target);
    cfg.devices = 5;
    cfg.count_per_device = Some(50);
    cfg.duration = Some(Duration::from_secs(30));
    cfg.subscribers = 1;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_over_tcp_and_tls() {
    let (dir, plain, tls, _stop) = hub().await;
    for (target, ca) in [
        (format!("mqtt://127.0.0.1:{}", plain.port()), None),
        (
            format!("mqtts://localhost:{}", tls.port()),
            Some(dir.path().join("ca.pem")),
        ),
    ] {
        let mut cfg = small(target.parse().unwrap());
        cfg.ca = ca;
        let r = run(cfg, std::future::pending(), |_| {}).await.unwrap();
        assert_eq!(r.connected, 5, "{target}: {:?}", r.errors);
        assert_eq!(r.connect_failures, 0);
        assert_eq!(r.published, 250);
        assert_eq!(r.acknowledged, 250);
        assert_eq!(r.ack_latency.count, 250);
        assert_eq!(
            r.delivered, 250,
            "{target}: the subscriber saw every message"
        );
        assert_eq!(r.delivery_latency.count, 250);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(!r.interrupted);
    }
}

#[tokio::test]
async fn unreachable_target_is_reported_not_hung() {
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = small(format!("mqtt://127.0.0.1:{port}").parse().unwrap());
    cfg.subscribers = 0;
    let r = run(cfg, std::future::pending(), |_| {}).await.unwrap();
    assert_eq!(r.connected, 0);
    assert_eq!(r.connect_failures, 5);
    assert_eq!(
        r.errors.get("connect: connection refused"),
        Some(&5),
        "{:?}",
        r.errors
    );
}

#[tokio::test]
async fn interrupt_gives_a_partial_report() {
    let (_dir, plain, _tls, _stop) = hub().await;
    let mut cfg = small(
        format!("mqtt://127.0.0.1:{}", plain.port())
            .parse()
            .unwrap(),
    );
    cfg.count_per_device = None;
    cfg.duration = Some(Duration::from_secs(3600));
    cfg.subscribers = 0;
    let r = run(cfg, tokio::time::sleep(Duration::from_millis(500)), |_| {})
        .await
        .unwrap();
    assert!(r.interrupted);
    assert!(r.acknowledged > 0);
    assert_eq!(
        r.published, r.acknowledged,
        "in-flight messages are drained before the report"
    );
}

#[test]
fn targets_parse_with_clear_errors() {
    assert_eq!(
        "mqtts://localhost:8883".parse::<Target>().unwrap(),
        Target {
            amqp: false,
            tls: true,
            host: "localhost".into(),
            port: 8883
        }
    );
    assert!("localhost:8883"
        .parse::<Target>()
        .unwrap_err()
        .contains("expected mqtt://"));
    assert!("mqtt://localhost"
        .parse::<Target>()
        .unwrap_err()
        .contains("missing :port"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_idle_devices_connected_until_the_end() {
    let (_dir, plain, _tls, _stop) = hub().await;
    let mut cfg = small(
        format!("mqtt://127.0.0.1:{}", plain.port())
            .parse()
            .unwrap(),
    );
    cfg.count_per_device = Some(0);
    cfg.hold = true;
    cfg.subscribers = 0;
    cfg.duration = Some(Duration::from_millis(800));
    let started = std::time::Instant::now();
    let r = run(cfg, std::future::pending(), |_| {}).await.unwrap();
    assert_eq!(r.connected, 5);
    assert_eq!(r.published, 0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "held until the duration ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iothub_mode_provisions_through_the_api_and_every_message_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = loopback_config(dir.path());
    c.management_token = Some("load-token".into());
    c.hostname = Some("localhost".into());
    let server = Server::bind(&c).await.unwrap();
    let tls = server.mqtts_addr().unwrap();
    let api = format!("http://{}", server.management_addr().unwrap());
    let pipeline = server.pipeline().clone();
    let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = rx.await;
    }));

    let wrong = {
        let api = api.clone();
        tokio::task::spawn_blocking(move || {
            edgehub_loadtest::iothub::provision(&api, "nope", "lt", 1)
        })
        .await
        .unwrap()
    };
    assert!(wrong.unwrap_err().contains("401"));

    let ids = tokio::task::spawn_blocking(move || {
        edgehub_loadtest::iothub::provision(&api, "load-token", "lt", 4)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0].device_id, "lt-0");

    let mut cfg = LoadConfig::new(format!("mqtts://localhost:{}", tls.port()).parse().unwrap());
    cfg.ca = Some(dir.path().join("ca.pem"));
    cfg.devices = 4;
    cfg.count_per_device = Some(25);
    cfg.identities = ids;
    let r = run(cfg, std::future::pending(), |_| {}).await.unwrap();
    assert_eq!(r.connected, 4, "{:?}", r.errors);
    assert_eq!(r.acknowledged, 100);
    // Acknowledged means stored: the hub's own count agrees.
    let stored = pipeline
        .store()
        .stats()
        .appended
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(stored, 100);
}
