//! Direct methods: a call from the service side (the management API, the
//! upstream link) is handed to the connected identity's link as a
//! [`Delivery::MethodRequest`] with a request id, and the answer its head
//! reports with that id ([`Methods::respond`]) completes the call.
//!
//! As IoT Hub: a payload is at most 128 KiB, the response timeout is 5–300 s,
//! a target that is not connected (or not subscribed to methods) answers 404,
//! and one that stays silent 504.
//!
//! Owns: calls in flight and their request ids. Must not touch: the wire
//! (the identity's head turns the request into its frames).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::link::{Delivery, Links, Offer};

pub const MAX_PAYLOAD: usize = 128 * 1024;
pub const MIN_TIMEOUT_SECS: u64 = 5;
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// IoT Hub's default `responseTimeoutInSeconds`.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MethodError {
    #[error("{0}")]
    Invalid(String),
    #[error("method payload is {0} bytes, more than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("{0} is not connected")]
    NotConnected(String),
    #[error("{0} is connected but has not subscribed to direct methods")]
    NotSubscribed(String),
    #[error("{identity} did not answer method {method:?} within {secs} s")]
    Timeout {
        identity: String,
        method: String,
        secs: u64,
    },
}

impl MethodError {
    /// The HTTP status IoT Hub answers with.
    pub fn status(&self) -> u16 {
        match self {
            MethodError::Invalid(_) => 400,
            MethodError::TooLarge(_) => 413,
            MethodError::NotConnected(_) | MethodError::NotSubscribed(_) => 404,
            MethodError::Timeout { .. } => 504,
        }
    }

    /// IoT Hub's error code for it.
    pub fn code(&self) -> super::error::ErrorCode {
        use super::error::ErrorCode;
        match self {
            MethodError::Invalid(_) => ErrorCode::ArgumentInvalid,
            MethodError::TooLarge(_) => ErrorCode::MessageTooLarge,
            MethodError::NotConnected(_) | MethodError::NotSubscribed(_) => {
                ErrorCode::DeviceNotOnline
            }
            MethodError::Timeout { .. } => ErrorCode::GatewayTimeout,
        }
    }
}

/// What the device answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodResponse {
    pub status: i32,
    pub payload: Bytes,
}

pub struct Methods {
    links: Arc<Links>,
    /// (session key, request id) → the waiting caller.
    pending: DashMap<(Arc<str>, u64), oneshot::Sender<MethodResponse>>,
    next_rid: AtomicU64,
}

/// A method name that fits in one topic level.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.contains(['/', '+', '#', '?'])
        && !name.chars().any(char::is_control)
}

impl Methods {
    pub fn new(links: Arc<Links>) -> Methods {
        Methods {
            links,
            pending: DashMap::new(),
            next_rid: AtomicU64::new(1),
        }
    }

    /// Calls `method` on the identity whose session is `identity` and waits
    /// for its answer. `connect_timeout` > 0 waits that long for the identity
    /// to connect first (IoT Hub's `connectTimeoutInSeconds`).
    pub async fn invoke(
        &self,
        identity: &str,
        method: &str,
        payload: Bytes,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<MethodResponse, MethodError> {
        if !valid_name(method) {
            return Err(MethodError::Invalid(format!(
                "method name {method:?} must be 1-128 characters without '/', '+', '#' or '?'"
            )));
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(MethodError::TooLarge(payload.len()));
        }
        let secs = response_timeout.as_secs();
        if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&secs) {
            return Err(MethodError::Invalid(format!(
                "responseTimeoutInSeconds must be {MIN_TIMEOUT_SECS}-{MAX_TIMEOUT_SECS}, not {secs}"
            )));
        }
        let until = tokio::time::Instant::now() + connect_timeout;
        while !self.links.is_connected(identity) {
            if tokio::time::Instant::now() >= until {
                return Err(MethodError::NotConnected(identity.to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rid = self.next_rid.fetch_add(1, Ordering::Relaxed);
        let key: (Arc<str>, u64) = (identity.into(), rid);
        let (tx, rx) = oneshot::channel();
        self.pending.insert(key.clone(), tx);
        // Removes the entry however this call ends (answer, timeout, or the
        // caller going away).
        struct Forget<'a>(&'a Methods, (Arc<str>, u64));
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.pending.remove(&self.1);
            }
        }
        let _forget = Forget(self, key);
        let request = Delivery::MethodRequest {
            method: method.to_owned(),
            request_id: rid,
            payload,
        };
        // Only a live link: a request is only worth something while the
        // caller still waits (IoT Hub sends them at QoS 0); one held for an
        // away session is not a call.
        match self.links.deliver(identity, request) {
            Offer::Sent => {}
            Offer::NotListening => return Err(MethodError::NotSubscribed(identity.into())),
            _ => return Err(MethodError::NotConnected(identity.into())),
        }
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            _ => Err(MethodError::Timeout {
                identity: identity.into(),
                method: method.into(),
                secs,
            }),
        }
    }

    /// The answer of `identity` to request `request_id`. `false` when no
    /// call waits for it (unknown, late or another identity's request id).
    pub fn respond(&self, identity: &str, request_id: u64, status: i32, payload: Bytes) -> bool {
        match self.pending.remove(&(Arc::from(identity), request_id)) {
            Some((_, tx)) => tx.send(MethodResponse { status, payload }).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::tests::MemoryLink;

    #[test]
    fn method_names_fit_one_topic_level() {
        assert!(valid_name("reboot") && !valid_name("a/b") && !valid_name(""));
        assert!(!valid_name(&"x".repeat(129)) && !valid_name("a#"));
    }

    #[tokio::test]
    async fn a_call_goes_to_the_live_link_and_its_answer_completes_it() {
        let links = Arc::new(Links::default());
        let methods = Arc::new(Methods::new(links.clone()));
        let t = Duration::from_secs(5);
        let r = methods
            .invoke("d1", "reboot", Bytes::new(), t, Duration::ZERO)
            .await;
        assert_eq!(r, Err(MethodError::NotConnected("d1".into())));
        let head = Arc::new(MemoryLink::default());
        let _link = links.attach("d1".into(), head.clone());
        let m2 = methods.clone();
        let call = tokio::spawn(async move {
            m2.invoke("d1", "reboot", Bytes::from_static(b"{}"), t, Duration::ZERO)
                .await
        });
        let rid = loop {
            if let Some((
                who,
                Delivery::MethodRequest {
                    method, request_id, ..
                },
            )) = head.got.lock().first()
            {
                assert_eq!((who.as_str(), method.as_str()), ("d1", "reboot"));
                break *request_id;
            }
            tokio::task::yield_now().await;
        };
        assert!(
            !methods.respond("d2", rid, 200, Bytes::new()),
            "another identity's id"
        );
        assert!(methods.respond("d1", rid, 201, Bytes::from_static(b"ok")));
        let answer = call.await.unwrap().unwrap();
        assert_eq!((answer.status, &answer.payload[..]), (201, &b"ok"[..]));
        assert!(
            !methods.respond("d1", rid, 200, Bytes::new()),
            "answered once"
        );
    }

    #[tokio::test]
    async fn a_link_that_does_not_listen_is_not_subscribed() {
        let links = Arc::new(Links::default());
        let methods = Methods::new(links.clone());
        let head = Arc::new(MemoryLink::default());
        *head.offer.lock() = Some(Offer::NotListening);
        let _link = links.attach("d1".into(), head);
        let r = methods
            .invoke(
                "d1",
                "m",
                Bytes::new(),
                Duration::from_secs(5),
                Duration::ZERO,
            )
            .await;
        assert_eq!(r, Err(MethodError::NotSubscribed("d1".into())));
    }
}
