//! The upstream link over MQTT: one connection per downstream identity, as
//! IoT Hub's MQTT endpoint requires.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgehub_codec::{Connect, Packet, Props, Protocol, Publish, QoS, Str};
use edgehub_mqtt_client::{dial, Client, ClientError};
use edgehub_router::{Message, SystemProperty};
use edgehub_store::Entry;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{
    credentials, open_failed, CloudToEdge, Control, Credentials, LinkState, OpenError, Shared,
    CONNECT_TIMEOUT, IDLE_CLOSE, WINDOW,
};

/// Telemetry or module-output topic of `identity` with the message's
/// property bag (system properties as `$.` keys).
fn upstream_topic(identity: &str, m: &Message) -> String {
    let base = match identity.split_once('/') {
        Some((d, module)) => format!("devices/{d}/modules/{module}/messages/events/"),
        None => format!("devices/{identity}/messages/events/"),
    };
    crate::iothub::deliveries::bag_topic(base, m)
}

/// One identity's connection to the parent.
struct Link {
    client: Client,
}

impl Link {
    async fn open(sh: &Shared, identity: &str) -> Result<Link, OpenError> {
        let remote = OpenError::Remote;
        let cfg = &sh.cfg;
        let Credentials { token, chain, .. } = credentials(sh, identity)?;
        let io = dial(&cfg.host, cfg.port, &cfg.transport, CONNECT_TIMEOUT)
            .await
            .map_err(|e| match e {
                ClientError::ServerName(_) => OpenError::Local(e.to_string()),
                e => remote(e.to_string()),
            })?;
        let connect = Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 60,
            properties: Props::default(),
            client_id: Str::from(identity),
            will: None,
            username: Some(Str::from(format!(
                "{}/{identity}/?api-version=2021-04-12&DeviceClientType=edgehub{}",
                cfg.iothub_hostname,
                chain.map_or(String::new(), |c| format!("&auth-chain={c}"))
            ))),
            password: Some(Bytes::from(token)),
        };
        match Client::handshake(io, connect, CONNECT_TIMEOUT).await {
            Ok(client) => Ok(Link { client }),
            Err(e) if e.is_auth_refusal() => Err(OpenError::Refused(format!(
                "upstream refused {identity}: {e}"
            ))),
            Err(e @ ClientError::Refused(_)) => {
                Err(remote(format!("upstream refused {identity}: {e}")))
            }
            Err(e) => Err(remote(e.to_string())),
        }
    }

    fn send(&mut self, p: &Packet) {
        self.client.send(p)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.client.flush().await
    }

    async fn recv(&mut self) -> Result<Packet, String> {
        self.client.recv().await.map_err(|e| match e {
            ClientError::Closed => "upstream closed the connection".to_owned(),
            ClientError::Protocol(p) => format!("protocol error from upstream: {p}"),
            e => e.to_string(),
        })
    }
}

/// One identity's upstream connection: forwards its messages in order and,
/// while the identity is connected here, relays what the parent sends it.
pub(super) async fn identity_worker(
    sh: Arc<Shared>,
    identity: String,
    mut rx: mpsc::UnboundedReceiver<Entry>,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Not yet acknowledged upstream, oldest first; the first `sent` of
    // them are on the current connection.
    let mut pending: VecDeque<Entry> = VecDeque::new();
    let mut online = false;
    'outer: loop {
        while pending.is_empty() && !online {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => pending.push_back(e),
                    None => return,
                },
                Some(c) = control.recv() => {
                    if let Control::Online(o) = c {
                        online = o;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
        tokio::select! {
            _ = sh.backoff.wait() => {}
            _ = shutdown.changed() => return,
        }
        let mut link = match Link::open(&sh, &identity).await {
            Ok(l) => {
                sh.backoff.succeeded();
                sh.link(LinkState::Up, "");
                debug!(identity, "upstream connection open");
                l
            }
            Err(e) => {
                if !open_failed(&sh, &identity, e, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let mut down = Downlink::new(&identity);
        if online {
            if let Some(relay) = &sh.relay {
                down.start(&mut link, relay.as_ref()).await;
            }
        }
        // Method answers come back from spawned calls.
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<(i32, String, Bytes)>();
        // packet id → position is implicit: ids are handed out in order.
        let mut inflight: VecDeque<u16> = VecDeque::new();
        let mut next_id: u16 = 1;
        let mut sent = 0usize;
        let mut idle_since = tokio::time::Instant::now();
        let mut ping_at = tokio::time::Instant::now() + Duration::from_secs(30);
        // The identity left: the connection closes once what is in flight
        // is acknowledged (closing sooner would send those again).
        let mut leaving = false;
        loop {
            if leaving && inflight.is_empty() {
                link.send(&Packet::Disconnect(Default::default()));
                let _ = link.flush().await;
                debug!(identity, "identity left; its upstream connection closed");
                continue 'outer;
            }
            while !leaving && sent < pending.len() && inflight.len() < WINDOW {
                let e = &pending[sent];
                let id = next_id;
                next_id = next_id.checked_add(1).unwrap_or(1);
                link.send(&Packet::Publish(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: Str::from(upstream_topic(&identity, &e.message)),
                    packet_id: id,
                    payload: e.message.body.clone(),
                    ..Default::default()
                }));
                inflight.push_back(id);
                sent += 1;
            }
            if let Err(e) = link.flush().await {
                sh.backoff.failed();
                sh.link(LinkState::Down, &e.to_string());
                continue 'outer;
            }
            let idle_deadline = idle_since + IDLE_CLOSE;
            tokio::select! {
                p = link.recv() => match p {
                    Ok(Packet::PubAck(a)) => {
                        if inflight.front() != Some(&a.packet_id) {
                            debug!(identity, packet_id = a.packet_id, "unexpected PUBACK; reconnecting");
                            continue 'outer;
                        }
                        inflight.pop_front();
                        let e = pending.pop_front().expect("in flight implies pending");
                        sent -= 1;
                        let _ = sh.done.send(e);
                        if pending.is_empty() {
                            idle_since = tokio::time::Instant::now();
                        }
                    }
                    Ok(Packet::Publish(p)) => {
                        if let Some(relay) = &sh.relay {
                            down.received(&mut link, relay, p, &answers_tx).await;
                        }
                    }
                    Ok(Packet::PingResp | Packet::SubAck(_)) => {}
                    Ok(p) => debug!(identity, packet = p.name(), "ignored from upstream"),
                    Err(e) => {
                        // Unacknowledged messages go again on the next
                        // connection (at least once).
                        let delay = sh.backoff.failed();
                        sh.link(LinkState::Down, &e);
                        debug!(identity, error = %e, retry_in_ms = delay.as_millis() as u64, "upstream connection lost");
                        continue 'outer;
                    }
                },
                e = rx.recv(), if sent == pending.len() => match e {
                    Some(e) => pending.push_back(e),
                    None => return,
                },
                Some(c) = control.recv() => match c {
                    Control::Online(true) => {
                        online = true;
                        leaving = false;
                        if let (Some(relay), false) = (&sh.relay, down.subscribed) {
                            down.start(&mut link, relay.as_ref()).await;
                        }
                    }
                    Control::Online(false) => {
                        online = false;
                        // The parent must stop seeing the identity as here
                        // (a method to it must get 404 there).
                        leaving = down.subscribed;
                    }
                    Control::Reported => {
                        if let (Some(relay), true) = (&sh.relay, down.subscribed) {
                            down.sync_reported(&mut link, relay.as_ref()).await;
                        }
                    }
                },
                Some((status, rid, payload)) = answers.recv() => {
                    link.send(&Packet::Publish(Publish {
                        qos: QoS::AtMostOnce,
                        topic: Str::from(format!("$iothub/methods/res/{status}/?$rid={rid}")),
                        payload,
                        ..Default::default()
                    }));
                }
                _ = tokio::time::sleep_until(ping_at) => {
                    link.send(&Packet::PingReq);
                    ping_at = tokio::time::Instant::now() + Duration::from_secs(30);
                }
                _ = tokio::time::sleep_until(idle_deadline), if pending.is_empty() && !online => {
                    link.send(&Packet::Disconnect(Default::default()));
                    let _ = link.flush().await;
                    debug!(identity, "idle upstream connection closed");
                    continue 'outer;
                }
                _ = shutdown.changed() => {
                    link.send(&Packet::Disconnect(Default::default()));
                    let _ = link.flush().await;
                    return;
                }
            }
        }
    }
}

/// The cloud-to-edge side of one identity's connection.
struct Downlink<'a> {
    identity: &'a str,
    subscribed: bool,
    next_rid: u64,
    /// Our twin GET waiting for its answer.
    twin_get: Option<String>,
    /// Reported properties sent up, waiting for the parent's 204.
    reported: Option<(String, serde_json::Map<String, serde_json::Value>)>,
}

impl<'a> Downlink<'a> {
    fn new(identity: &'a str) -> Downlink<'a> {
        Downlink {
            identity,
            subscribed: false,
            next_rid: 1,
            twin_get: None,
            reported: None,
        }
    }

    fn rid(&mut self, kind: char) -> String {
        self.next_rid += 1;
        format!("{kind}{}", self.next_rid)
    }

    /// Subscribes to the identity's cloud traffic, reads its twin and sends
    /// the reported properties accepted while the link was down.
    async fn start(&mut self, link: &mut Link, relay: &dyn CloudToEdge) {
        let mut filters = vec![
            "$iothub/methods/POST/#".to_owned(),
            "$iothub/twin/res/#".to_owned(),
            "$iothub/twin/PATCH/properties/desired/#".to_owned(),
        ];
        if !self.identity.contains('/') {
            // Modules get no C2D messages.
            filters.push(format!("devices/{}/messages/devicebound/#", self.identity));
        }
        link.send(&Packet::Subscribe(edgehub_codec::Subscribe {
            packet_id: u16::MAX, // apart from the PUBLISH ids, which count up from 1
            properties: Props::default(),
            filters: filters
                .into_iter()
                .map(|f| {
                    let o = edgehub_codec::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    };
                    (Str::from(f), o)
                })
                .collect(),
        }));
        self.subscribed = true;
        let rid = self.rid('g');
        link.send(&Packet::Publish(Publish {
            qos: QoS::AtMostOnce,
            topic: Str::from(format!("$iothub/twin/GET/?$rid={rid}")),
            ..Default::default()
        }));
        self.twin_get = Some(rid);
        self.sync_reported(link, relay).await;
    }

    async fn sync_reported(&mut self, link: &mut Link, relay: &dyn CloudToEdge) {
        if self.reported.is_some() {
            return; // one at a time; the next goes when this one is answered
        }
        if let Some((patch, snapshot)) = relay.reported_to_sync(self.identity).await {
            let rid = self.rid('r');
            link.send(&Packet::Publish(Publish {
                qos: QoS::AtMostOnce,
                topic: Str::from(format!(
                    "$iothub/twin/PATCH/properties/reported/?$rid={rid}"
                )),
                payload: Bytes::from(patch.to_string()),
                ..Default::default()
            }));
            self.reported = Some((rid, snapshot));
        }
    }

    async fn received(
        &mut self,
        link: &mut Link,
        relay: &Arc<dyn CloudToEdge>,
        p: Publish,
        answers: &mpsc::UnboundedSender<(i32, String, Bytes)>,
    ) {
        let topic: &str = &p.topic;
        let identity = self.identity;
        let mut ack = p.qos != QoS::AtMostOnce;
        if let Some(bag) = topic
            .strip_prefix("devices/")
            .and_then(|r| r.split_once("/messages/devicebound"))
            .map(|(_, bag)| bag.trim_start_matches('/'))
        {
            let mut msg = Message::new(p.payload.clone());
            if let Err(e) = crate::iothub::telemetry::apply_property_bag(&mut msg, bag) {
                warn!(identity, error = %e, "cloud-to-device message with a bad property bag; dropped");
            } else {
                if msg.system(SystemProperty::To).is_none() {
                    msg.set_system(
                        SystemProperty::To,
                        &format!("/devices/{identity}/messages/deviceBound"),
                    );
                }
                if let Err(e) = relay.c2d(identity, msg).await {
                    // Not acknowledged: the parent keeps it and sends it again.
                    warn!(identity, error = %e, "cloud-to-device message not queued here; left with the parent");
                    ack = false;
                }
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            let (name, query) = rest.split_once("/?").unwrap_or((rest, ""));
            let rid = edgehub_device::query_value(query, "$rid")
                .unwrap_or_default()
                .to_owned();
            let (relay, answers, who, name) = (
                relay.clone(),
                answers.clone(),
                identity.to_owned(),
                name.to_owned(),
            );
            let payload = p.payload.clone();
            tokio::spawn(async move {
                let (status, body) = relay.method(&who, &name, payload).await;
                let _ = answers.send((status, rid, body));
            });
        } else if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
            match serde_json::from_slice::<serde_json::Value>(&p.payload) {
                Ok(serde_json::Value::Object(patch)) => relay.desired_patch(identity, patch),
                _ => warn!(
                    identity,
                    "desired-properties patch from upstream is not a JSON object"
                ),
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            let (status, query) = rest.split_once("/?").unwrap_or((rest, ""));
            let rid = edgehub_device::query_value(query, "$rid").unwrap_or_default();
            let ok = status.starts_with('2');
            if self.twin_get.as_deref() == Some(rid) {
                self.twin_get = None;
                let desired = serde_json::from_slice::<serde_json::Value>(&p.payload)
                    .ok()
                    .and_then(|t| t.get("desired").cloned());
                match desired {
                    Some(serde_json::Value::Object(d)) if ok => relay.adopt_desired(identity, d),
                    _ => warn!(
                        identity,
                        status, "twin from upstream unreadable; the local copy stays"
                    ),
                }
            } else if self.reported.as_ref().is_some_and(|(r, _)| r == rid) {
                let (_, snapshot) = self.reported.take().expect("checked");
                if ok {
                    relay.reported_synced(identity, snapshot);
                    // Changes made while this one was on its way.
                    self.sync_reported(link, relay.as_ref()).await;
                } else {
                    warn!(identity, status, "parent refused reported properties; retried on the next change or connection");
                }
            }
        } else {
            debug!(identity, topic, "unexpected publish from upstream; ignored");
        }
        if ack {
            link.send(&Packet::PubAck(edgehub_codec::PubResp::new(p.packet_id, 0)));
        }
    }
}
