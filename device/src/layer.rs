//! The operations an authenticated identity's head calls, and the pushes
//! towards an identity, in one place for every protocol head: twin GET,
//! reported-properties patch, method answers, desired-property patches.
//!
//! Twin reads and writes run on one worker thread in arrival order, so two
//! patches from one identity are applied in the order it sent them and no
//! head's connection task waits for a store write. Each answer goes back
//! to the asking identity's own link as a [`Delivery::TwinAnswer`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use edgehub_router::Message;
use edgehub_store::StoreError;
use serde_json::Value;
use tracing::{debug, warn};

use crate::error::{error_body, ErrorCode};
use crate::link::{Delivery, Links, Offer};
use crate::methods::Methods;
use crate::twin::{parse_patch, TwinError, Twins};

type Job = Box<dyn FnOnce() + Send>;

/// Resolves once accepted telemetry is durable (with its store sequence),
/// or says why the store refused it.
pub type Stored = Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send>>;

/// Where accepted telemetry goes next: the hub's routes and store.
pub trait TelemetrySink: Send + Sync + 'static {
    /// Routes and stores `msg`. `Ok(None)`: no route took it (counted and
    /// dropped, as IoT Edge does: the sender did nothing wrong).
    fn submit(&self, msg: Message) -> Result<Option<Stored>, StoreError>;
}

/// Told the identity whose reported properties just changed.
pub type ReportedHook = Box<dyn Fn(&str) + Send + Sync>;

pub struct DeviceLayer {
    pub twins: Arc<Twins>,
    pub methods: Methods,
    pub links: Arc<Links>,
    jobs: std::sync::mpsc::Sender<Job>,
    /// Told (on the twin worker) when an identity's reported properties
    /// changed, so the upstream link can pass them on.
    reported_hook: OnceLock<ReportedHook>,
    telemetry: OnceLock<Arc<dyn TelemetrySink>>,
}

fn error_bytes(code: ErrorCode, e: &impl std::fmt::Display) -> Bytes {
    Bytes::from(error_body(code, &e.to_string()).to_string())
}

impl DeviceLayer {
    pub fn new(twins: Arc<Twins>) -> Arc<DeviceLayer> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("twin-worker".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawn the twin worker thread");
        let links = Arc::new(Links::default());
        Arc::new(DeviceLayer {
            twins,
            methods: Methods::new(links.clone()),
            links,
            jobs: tx,
            reported_hook: OnceLock::new(),
            telemetry: OnceLock::new(),
        })
    }

    /// Where telemetry goes once accepted (set once, before heads serve).
    pub fn set_telemetry_sink(&self, sink: Arc<dyn TelemetrySink>) {
        let _ = self.telemetry.set(sink);
    }

    /// `identity` sends `msg` (body, application and system properties as
    /// its head read them): stamped with the identity and the hub's
    /// enqueued time, routed, stored. Resolves when durable; the head
    /// acknowledges the sender only then.
    pub fn send_telemetry(
        &self,
        identity: &str,
        msg: Message,
    ) -> Result<Option<Stored>, StoreError> {
        let msg = crate::telemetry::accept(msg, identity, &crate::telemetry::enqueued_time_now());
        match self.telemetry.get() {
            Some(sink) => sink.submit(msg),
            None => Err(StoreError::Closed),
        }
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

    /// `identity` asks for its twin; the answer (200 with the desired and
    /// reported sections) comes back to its link under `request`.
    pub fn twin_get(self: &Arc<Self>, identity: &Arc<str>, request: String) {
        let (me, who) = (self.clone(), identity.clone());
        self.run_twin_job(move || {
            let (status, body) = match me.twins.get(&who) {
                Ok(t) => (200, Bytes::from(t.device_view().to_string())),
                Err(e) => (500, error_bytes(ErrorCode::ServerError, &e)),
            };
            me.answer(&who, request, status, None, body);
        });
    }

    /// `identity` patches its reported properties; answered 204 with the
    /// new version, or 400 / 413 / 500 with an IoT Hub error body.
    pub fn patch_reported(self: &Arc<Self>, identity: &Arc<str>, request: String, patch: Bytes) {
        let (me, who) = (self.clone(), identity.clone());
        self.run_twin_job(move || {
            let r = parse_patch(&patch).and_then(|p| me.twins.patch_reported(&who, p));
            match r {
                Ok(v) => {
                    if let Some(hook) = me.reported_hook.get() {
                        hook(&who);
                    }
                    me.answer(&who, request, 204, Some(v), Bytes::new());
                }
                Err(e) => {
                    let (status, code) = match e {
                        TwinError::Invalid(_) => (400, ErrorCode::ArgumentInvalid),
                        TwinError::TooLarge { .. } => (413, ErrorCode::MessageTooLarge),
                        TwinError::Store(_) => (500, ErrorCode::ServerError),
                    };
                    debug!(identity = %who, error = %e, "reported properties refused");
                    me.answer(&who, request, status, None, error_bytes(code, &e));
                }
            }
        });
    }

    /// `identity` answers method request `request_id`; `false` when no
    /// call waits for it.
    pub fn method_response(
        &self,
        identity: &str,
        request_id: u64,
        status: i32,
        payload: Bytes,
    ) -> bool {
        self.methods.respond(identity, request_id, status, payload)
    }

    fn answer(
        &self,
        identity: &str,
        request: String,
        status: u16,
        version: Option<u64>,
        body: Bytes,
    ) {
        let d = Delivery::TwinAnswer {
            request,
            status,
            version,
            body,
        };
        let r = self.links.deliver(identity, d);
        if !matches!(r, Offer::Sent | Offer::Held) {
            debug!(identity, status, outcome = ?r, "twin answer not delivered");
        }
    }

    /// Sends a desired-properties patch (with its `$version`) to `identity`
    /// if it listens; a device that is away reads the whole twin when it
    /// comes back, as with IoT Hub.
    pub fn push_desired(&self, identity: &str, patch: &Value) {
        let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
        let d = Delivery::DesiredPatch {
            version,
            patch: Bytes::from(patch.to_string()),
        };
        match self.links.deliver(identity, d) {
            Offer::Sent | Offer::Held => {}
            Offer::Full => warn!(
                identity,
                "desired-properties patch dropped: the link's queue is full"
            ),
            other => debug!(identity, outcome = ?other, "desired-properties patch not pushed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::tests::MemoryLink;

    fn layer() -> (tempfile::TempDir, Arc<DeviceLayer>) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            edgehub_store::Store::open(edgehub_store::StoreConfig::new(dir.path())).unwrap();
        (dir, DeviceLayer::new(Arc::new(Twins::new(store))))
    }

    /// The next twin answer the link got, waiting for the worker.
    fn next_answer(head: &MemoryLink) -> (String, u16, Option<u64>, Value) {
        for _ in 0..500 {
            let got = head.got.lock().drain(..).next();
            if let Some((
                _,
                Delivery::TwinAnswer {
                    request,
                    status,
                    version,
                    body,
                },
            )) = got
            {
                let body = if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&body).unwrap()
                };
                return (request, status, version, body);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no twin answer");
    }

    #[test]
    fn reported_patches_apply_in_order_and_answer_the_asking_link() {
        let (_dir, layer) = layer();
        let head = Arc::new(MemoryLink::default());
        let other = Arc::new(MemoryLink::default());
        let who: Arc<str> = "d1".into();
        let _l1 = layer.links.attach(who.clone(), head.clone());
        let _l2 = layer.links.attach("d2".into(), other.clone());
        layer.patch_reported(&who, "1".into(), Bytes::from_static(br#"{"a":1}"#));
        let (rid, status, first, _) = next_answer(&head);
        assert_eq!((rid.as_str(), status), ("1", 204));
        let first = first.expect("an accepted patch answers with its version");
        layer.patch_reported(&who, "2".into(), Bytes::from_static(br#"{"a":null,"b":2}"#));
        assert_eq!(
            next_answer(&head),
            ("2".into(), 204, Some(first + 1), Value::Null)
        );
        layer.twin_get(&who, "3".into());
        let (rid, status, _, twin) = next_answer(&head);
        assert_eq!((rid.as_str(), status), ("3", 200));
        assert_eq!(twin["reported"]["b"], 2);
        assert!(twin["reported"].get("a").is_none());
        assert_eq!(twin["reported"]["$version"], first + 1);
        assert!(other.got.lock().is_empty(), "answers go to the asker only");
    }

    #[test]
    fn a_refused_patch_answers_with_an_iot_hub_error() {
        let (_dir, layer) = layer();
        let head = Arc::new(MemoryLink::default());
        let who: Arc<str> = "d1".into();
        let _l = layer.links.attach(who.clone(), head.clone());
        layer.patch_reported(&who, "7".into(), Bytes::from_static(b"[1]"));
        let (rid, status, version, body) = next_answer(&head);
        assert_eq!((rid.as_str(), status, version), ("7", 400, None));
        assert_eq!(body["errorCode"], 400004);
        let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(40 * 1024));
        layer.patch_reported(&who, "8".into(), Bytes::from(big));
        let (_, status, _, body) = next_answer(&head);
        assert_eq!((status, body["errorCode"].as_u64()), (413, Some(413001)));
    }

    #[test]
    fn telemetry_is_stamped_with_the_sender_and_handed_on() {
        use edgehub_router::{MessageSource, SystemProperty};
        struct Keep(parking_lot::Mutex<Vec<Message>>);
        impl TelemetrySink for Keep {
            fn submit(&self, msg: Message) -> Result<Option<Stored>, StoreError> {
                let stored = msg.body.len() as u64;
                self.0.lock().push(msg);
                Ok(Some(Box::pin(async move { Ok(stored) })))
            }
        }
        let (_dir, layer) = layer();
        assert!(matches!(
            layer.send_telemetry("d1", Message::new(Bytes::new())),
            Err(StoreError::Closed)
        ));
        let keep = Arc::new(Keep(Default::default()));
        layer.set_telemetry_sink(keep.clone());
        let mut m = Message::new(Bytes::from_static(b"abc"));
        m.set_system(SystemProperty::ConnectionDeviceId, "forged");
        let stored = layer.send_telemetry("edge/filter", m).unwrap().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(stored).unwrap(), 3);
        let got = keep.0.lock();
        let m = &got[0];
        assert_eq!(
            m.system(SystemProperty::ConnectionDeviceId).map(|s| &**s),
            Some("edge")
        );
        assert!(m
            .system(SystemProperty::EnqueuedTime)
            .is_some_and(|t| t.ends_with('Z')));
        assert!(matches!(m.source, Some(MessageSource::ModuleOutput { .. })));
    }

    #[test]
    fn desired_patches_carry_their_version() {
        let (_dir, layer) = layer();
        let head = Arc::new(MemoryLink::default());
        let _l = layer.links.attach("d1".into(), head.clone());
        layer.push_desired("d1", &serde_json::json!({"t": 5, "$version": 9}));
        let got = head.got.lock().pop();
        match got {
            Some((id, Delivery::DesiredPatch { version, patch })) => {
                assert_eq!((id.as_str(), version), ("d1", 9));
                assert_eq!(serde_json::from_slice::<Value>(&patch).unwrap()["t"], 5);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
