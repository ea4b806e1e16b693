//! Device links: how the device layer reaches an authenticated identity,
//! whichever protocol head holds its connection.
//!
//! A head that accepts an identity attaches a [`LinkSink`] for it
//! ([`Links::attach`]) and keeps the returned [`DeviceLink`] while the
//! connection lives. One live link per identity: attaching a second one
//! takes over (the first sink is told, and its head closes its
//! connection). Everything the hub has for an identity — cloud-to-device
//! messages, module inputs, desired-property patches, method requests and
//! the answers to its own twin requests — is a [`Delivery`] handed to that
//! identity's sink, which turns it into its protocol's frames. While no
//! link is attached, deliveries go to the fallback sink (the MQTT head's
//! persistent sessions keep what an away device will receive).
//!
//! Presence (connected or not, last activity) follows attach and detach;
//! the presence hook tells the upstream link.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;
use edgehub_router::Message;

use crate::c2d::LockToken;
use crate::presence::Presence;

/// Something the hub has for one identity.
#[derive(Debug)]
pub enum Delivery {
    /// A cloud-to-device message under a lock (devices only).
    CloudToDevice {
        message: Arc<Message>,
        lock: LockToken,
        /// This attempt included (1 on the first delivery).
        delivery_count: u32,
        receipt: Arc<Receipt>,
    },
    /// A message routed to one of a module's inputs.
    ModuleInput {
        input: Arc<str>,
        message: Arc<Message>,
        receipt: Arc<Receipt>,
    },
    /// A desired-properties patch (JSON, `$version` inside) with its version.
    DesiredPatch { version: u64, patch: Bytes },
    /// A direct-method call; answered with [`crate::methods::Methods::respond`].
    MethodRequest {
        method: String,
        request_id: u64,
        payload: Bytes,
    },
    /// The answer to a twin request of this identity. `request` is the
    /// head's own correlation (MQTT: `$rid`); `version` is the twin's
    /// reported version after an accepted patch.
    TwinAnswer {
        request: String,
        status: u16,
        version: Option<u64>,
        body: Bytes,
    },
}

impl Delivery {
    /// The receipt of a stored message's delivery (cloud-to-device, module
    /// input); the other deliveries are not followed.
    pub fn receipt(&self) -> Option<&Arc<Receipt>> {
        match self {
            Delivery::CloudToDevice { receipt, .. } | Delivery::ModuleInput { receipt, .. } => {
                Some(receipt)
            }
            _ => None,
        }
    }
}

/// What became of a delivery handed to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// On its way over a live link.
    Sent,
    /// Kept for a link that is away (a persistent session).
    Held,
    /// The identity has a link but does not listen for this kind
    /// (MQTT: not subscribed to the topic).
    NotListening,
    /// The link's queue is full.
    Full,
    /// No link and nothing that keeps it.
    NoLink,
}

/// A protocol head's side of an identity's link.
pub trait LinkSink: Send + Sync + 'static {
    /// Turns `delivery` for `identity` into the head's frames.
    fn deliver(&self, identity: &str, delivery: Delivery) -> Offer;
    /// Another link for the same identity was attached: close this one.
    fn taken_over(&self) {}
}

/// Told `(identity, connected)` on every attach and detach.
pub type PresenceHook = Box<dyn Fn(&str, bool) + Send + Sync>;

struct Attached {
    id: u64,
    sink: Arc<dyn LinkSink>,
}

/// The live link of every identity, and the fallback for those away.
pub struct Links {
    live: DashMap<Arc<str>, Attached>,
    fallback: OnceLock<Arc<dyn LinkSink>>,
    next_id: AtomicU64,
    pub presence: Presence,
    presence_hook: OnceLock<PresenceHook>,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            live: DashMap::new(),
            fallback: OnceLock::new(),
            next_id: AtomicU64::new(1),
            presence: Presence::default(),
            presence_hook: OnceLock::new(),
        }
    }
}

impl Links {
    /// Where deliveries for identities without a live link go (set once).
    pub fn set_fallback(&self, sink: Arc<dyn LinkSink>) {
        let _ = self.fallback.set(sink);
    }

    /// Calls `hook` on every attach and detach (set once).
    pub fn set_presence_hook(&self, hook: PresenceHook) {
        let _ = self.presence_hook.set(hook);
    }

    /// `identity` is connected through `sink` until the returned link is
    /// dropped. A link it replaces is told it was taken over.
    pub fn attach(self: &Arc<Self>, identity: Arc<str>, sink: Arc<dyn LinkSink>) -> DeviceLink {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = self.live.insert(identity.clone(), Attached { id, sink });
        if let Some(p) = previous {
            p.sink.taken_over();
        }
        self.presence.record(&identity, true);
        if let Some(hook) = self.presence_hook.get() {
            hook(&identity, true);
        }
        DeviceLink {
            links: self.clone(),
            identity,
            id,
        }
    }

    /// Whether `identity` has a live link.
    pub fn is_connected(&self, identity: &str) -> bool {
        self.live.contains_key(identity)
    }

    /// Hands `delivery` to the live link of `identity`, or to the fallback.
    pub fn deliver(&self, identity: &str, delivery: Delivery) -> Offer {
        let sink = match self.live.get(identity) {
            Some(a) => a.sink.clone(),
            None => match self.fallback.get() {
                Some(f) => f.clone(),
                None => return Offer::NoLink,
            },
        };
        // Outside the map's lock: a sink may take its time.
        sink.deliver(identity, delivery)
    }

    fn detach(&self, identity: &Arc<str>, id: u64) {
        // Only the link that is still current: one that was taken over
        // leaves its successor alone.
        if self.live.remove_if(identity, |_, a| a.id == id).is_some() {
            self.presence.record(identity, false);
            if let Some(hook) = self.presence_hook.get() {
                hook(identity, false);
            }
        }
    }
}

/// An identity's live link, held by the head for as long as its
/// connection lasts; dropping it detaches.
pub struct DeviceLink {
    links: Arc<Links>,
    identity: Arc<str>,
    id: u64,
}

impl DeviceLink {
    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }
}

impl Drop for DeviceLink {
    fn drop(&mut self) {
        self.links.detach(&self.identity, self.id);
    }
}

impl std::fmt::Debug for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLink")
            .field("identity", &self.identity)
            .finish()
    }
}

/// How a head reports on one delivery of a stored message (C2D, module
/// input) to the endpoint executor that follows it. The first report
/// wins; later ones are ignored.
pub struct Receipt {
    state: AtomicU8,
    wake: Box<dyn Fn() + Send + Sync>,
}

/// A delivery's state as the executor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Pending,
    /// The receiver has it (MQTT PUBACK, AMQP accepted).
    Completed,
    /// The receiver refused it for good (AMQP rejected).
    Rejected,
    /// The receiver gave it back (AMQP released/modified).
    Abandoned,
    /// It left the link without a settlement (the connection ended).
    Lost,
    /// The executor let go of it (never reached a link, or was discarded
    /// by the head): nothing to report.
    Cancelled,
}

impl Receipt {
    /// `wake` runs once when the head reports (not on cancel).
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Receipt {
        Receipt {
            state: AtomicU8::new(0),
            wake: Box::new(wake),
        }
    }

    fn settle(&self, to: Settled, wake: bool) {
        if self
            .state
            .compare_exchange(0, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && wake
        {
            (self.wake)();
        }
    }

    pub fn complete(&self) {
        self.settle(Settled::Completed, true)
    }
    pub fn reject(&self) {
        self.settle(Settled::Rejected, true)
    }
    pub fn abandon(&self) {
        self.settle(Settled::Abandoned, true)
    }
    pub fn lost(&self) {
        self.settle(Settled::Lost, true)
    }
    pub fn cancel(&self) {
        self.settle(Settled::Cancelled, false)
    }

    pub fn state(&self) -> Settled {
        match self.state.load(Ordering::Acquire) {
            0 => Settled::Pending,
            1 => Settled::Completed,
            2 => Settled::Rejected,
            3 => Settled::Abandoned,
            4 => Settled::Lost,
            _ => Settled::Cancelled,
        }
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Receipt({:?})", self.state())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// An in-memory head: records what it is handed, answers with `offer`.
    #[derive(Default)]
    pub struct MemoryLink {
        pub got: Mutex<Vec<(String, Delivery)>>,
        pub taken_over: std::sync::atomic::AtomicBool,
        pub offer: Mutex<Option<Offer>>,
    }

    impl LinkSink for MemoryLink {
        fn deliver(&self, identity: &str, d: Delivery) -> Offer {
            self.got.lock().push((identity.to_owned(), d));
            self.offer.lock().unwrap_or(Offer::Sent)
        }
        fn taken_over(&self) {
            self.taken_over.store(true, Ordering::SeqCst);
        }
    }

    fn patch(v: u64) -> Delivery {
        Delivery::DesiredPatch {
            version: v,
            patch: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn deliveries_go_to_the_live_link_then_the_fallback() {
        let links = Arc::new(Links::default());
        assert_eq!(links.deliver("d1", patch(1)), Offer::NoLink);
        let fallback = Arc::new(MemoryLink::default());
        *fallback.offer.lock() = Some(Offer::Held);
        links.set_fallback(fallback.clone());
        assert_eq!(links.deliver("d1", patch(1)), Offer::Held);
        let live = Arc::new(MemoryLink::default());
        let link = links.attach("d1".into(), live.clone());
        assert!(links.is_connected("d1") && !links.is_connected("d2"));
        assert_eq!(links.deliver("d1", patch(2)), Offer::Sent);
        assert_eq!(links.deliver("d2", patch(3)), Offer::Held);
        drop(link);
        assert!(!links.is_connected("d1"));
        assert_eq!(links.deliver("d1", patch(4)), Offer::Held);
        let versions = |m: &MemoryLink| -> Vec<(String, u64)> {
            m.got
                .lock()
                .iter()
                .map(|(i, d)| match d {
                    Delivery::DesiredPatch { version, .. } => (i.clone(), *version),
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        assert_eq!(versions(&live), vec![("d1".into(), 2)]);
        assert_eq!(
            versions(&fallback),
            vec![("d1".into(), 1), ("d2".into(), 3), ("d1".into(), 4)]
        );
    }

    #[test]
    fn a_second_link_takes_over_and_the_first_leaving_does_not_detach_it() {
        let links = Arc::new(Links::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        links.set_presence_hook(Box::new(move |id, up| s2.lock().push((id.to_owned(), up))));
        let (a, b) = (
            Arc::new(MemoryLink::default()),
            Arc::new(MemoryLink::default()),
        );
        let first = links.attach("d1".into(), a.clone());
        let second = links.attach("d1".into(), b.clone());
        assert!(a.taken_over.load(Ordering::SeqCst));
        assert!(!b.taken_over.load(Ordering::SeqCst));
        drop(first);
        assert!(links.is_connected("d1"), "the successor stays attached");
        assert_eq!(links.deliver("d1", patch(1)), Offer::Sent);
        assert_eq!(b.got.lock().len(), 1);
        assert!(a.got.lock().is_empty());
        assert_eq!(links.presence.state("d1").0, "Connected");
        drop(second);
        assert_eq!(links.presence.state("d1").0, "Disconnected");
        assert_eq!(
            *seen.lock(),
            vec![
                ("d1".into(), true),
                ("d1".into(), true),
                ("d1".into(), false)
            ]
        );
    }

    #[test]
    fn a_receipt_keeps_its_first_report_and_wakes_once() {
        let woken = Arc::new(AtomicU64::new(0));
        let w = woken.clone();
        let r = Receipt::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(r.state(), Settled::Pending);
        r.complete();
        r.lost();
        r.reject();
        assert_eq!(r.state(), Settled::Completed);
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        let w = woken.clone();
        let r = Receipt::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        r.cancel();
        r.lost();
        assert_eq!(r.state(), Settled::Cancelled);
        assert_eq!(woken.load(Ordering::SeqCst), 1, "cancel does not wake");
    }
}
