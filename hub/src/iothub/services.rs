//! The `$iothub/…` request topics of an authenticated device or module:
//! twin GET, reported-properties PATCH and direct-method answers; and the
//! pushes towards one identity (desired-property patches).
//!
//! Every reply goes to the asking identity's own session only
//! ([`Broker::deliver_to`]): `$iothub/twin/res/#` is the same filter for
//! every device, so the shared subscription index must never carry it.
//! Twin reads and writes run on one worker thread in arrival order, so two
//! patches from one device are applied in the order it sent them, and the
//! connection task never waits for a store write.
//!
//! Owns: the request/response shapes of twins and methods on MQTT. Must not
//! touch: telemetry (the pipeline's) or authorization (done before).

use std::sync::Arc;

use bytes::Bytes;
use edgehub_codec::{Props, QoS, Str};
use serde_json::Value;
use tracing::{debug, warn};

use super::error::ErrorCode;
use super::methods::Methods;
use super::twin::{parse_patch, TwinError, Twins};
use crate::broker::session::Message;
use crate::broker::{Broker, Targeted};

type Job = Box<dyn FnOnce() + Send>;

/// Told the identity whose reported properties just changed.
pub type ReportedHook = Box<dyn Fn(&str) + Send + Sync>;

pub struct Services {
    pub twins: Arc<Twins>,
    pub methods: Methods,
    broker: Arc<Broker>,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Told (on the twin worker) when an identity's reported properties
    /// changed, so the upstream link can pass them on.
    reported_hook: std::sync::OnceLock<ReportedHook>,
}

/// The value of `key` in a `k=v&k=v` query.
pub fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether a publish was one of ours.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    Yes,
    /// Not an `$iothub/` request topic we serve (the caller refuses it).
    Unknown,
}

fn message(topic: String, payload: Bytes, qos: QoS) -> Arc<Message> {
    Arc::new(Message {
        topic: Str::from(topic),
        payload,
        qos,
        retain: false,
        properties: Props::default(),
        expires_at: None,
        origin: None,
        delivered: None,
    })
}

fn error_body(code: ErrorCode, e: &impl std::fmt::Display) -> Bytes {
    Bytes::from(super::error::error_body(code, &e.to_string()).to_string())
}

impl Services {
    pub fn new(broker: Arc<Broker>, twins: Arc<Twins>) -> Arc<Services> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("twin-worker".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawn the twin worker thread");
        Arc::new(Services {
            twins,
            methods: Methods::new(broker.clone()),
            broker,
            jobs: tx,
            reported_hook: std::sync::OnceLock::new(),
        })
    }

    /// Calls `hook` after every accepted reported-properties patch (set once).
    pub fn set_reported_hook(&self, hook: ReportedHook) {
        let _ = self.reported_hook.set(hook);
    }

    /// Runs `job` on the twin worker, in order with every other twin job.
    pub fn run_twin_job(&self, job: impl FnOnce() + Send + 'static) {
        // The worker lives as long as the process; a send cannot fail.
        let _ = self.jobs.send(Box::new(job));
    }

    /// A publish of `identity` (its session key) on an `$iothub/` topic.
    pub fn on_publish(
        self: &Arc<Self>,
        identity: &Arc<str>,
        topic: &str,
        payload: Bytes,
    ) -> Handled {
        if topic.starts_with("$iothub/methods/res/") {
            if !self.methods.respond(identity, topic, payload) {
                debug!(identity = %identity, topic, "method answer for no waiting call; ignored");
            }
            return Handled::Yes;
        }
        let (op, query) = match topic.split_once("/?") {
            Some((op, q)) => (op, q),
            None => (topic, ""),
        };
        let rid = query_value(query, "$rid").unwrap_or_default().to_owned();
        let (me, who) = (self.clone(), identity.clone());
        match op {
            "$iothub/twin/GET" => self.run_twin_job(move || {
                let (status, body) = match me.twins.get(&who) {
                    Ok(t) => (200, Bytes::from(t.device_view().to_string())),
                    Err(e) => (500, error_body(ErrorCode::ServerError, &e)),
                };
                me.reply(
                    &who,
                    &format!("$iothub/twin/res/{status}/?$rid={rid}"),
                    body,
                );
            }),
            "$iothub/twin/PATCH/properties/reported" => self.run_twin_job(move || {
                let r = parse_patch(&payload).and_then(|p| me.twins.patch_reported(&who, p));
                if r.is_ok() {
                    if let Some(hook) = me.reported_hook.get() {
                        hook(&who);
                    }
                }
                let (topic, body) = match r {
                    Ok(v) => (
                        format!("$iothub/twin/res/204/?$rid={rid}&$version={v}"),
                        Bytes::new(),
                    ),
                    Err(e) => {
                        let (status, code) = match e {
                            TwinError::Invalid(_) => (400, ErrorCode::ArgumentInvalid),
                            TwinError::TooLarge { .. } => (413, ErrorCode::MessageTooLarge),
                            TwinError::Store(_) => (500, ErrorCode::ServerError),
                        };
                        debug!(identity = %who, error = %e, "reported properties refused");
                        (
                            format!("$iothub/twin/res/{status}/?$rid={rid}"),
                            error_body(code, &e),
                        )
                    }
                };
                me.reply(&who, &topic, body);
            }),
            _ => return Handled::Unknown,
        }
        Handled::Yes
    }

    fn reply(&self, identity: &str, topic: &str, body: Bytes) {
        let r = self
            .broker
            .deliver_to(identity, message(topic.to_owned(), body, QoS::AtLeastOnce));
        if !matches!(r, Targeted::Queued | Targeted::QueuedOffline) {
            debug!(identity, topic, outcome = ?r, "twin response not delivered");
        }
    }

    /// Sends a desired-properties patch (with its `$version`) to `identity`
    /// if it listens; a device that is away reads the whole twin when it
    /// comes back, as with IoT Hub.
    pub fn push_desired(&self, identity: &str, patch: &Value) {
        let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
        let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={version}");
        let r = self.broker.deliver_to(
            identity,
            message(topic, Bytes::from(patch.to_string()), QoS::AtLeastOnce),
        );
        match r {
            Targeted::Queued | Targeted::QueuedOffline => {}
            Targeted::QueueFull => {
                warn!(
                    identity,
                    "desired-properties patch dropped: session queue full"
                )
            }
            other => debug!(identity, outcome = ?other, "desired-properties patch not pushed"),
        }
    }
}
