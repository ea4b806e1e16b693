//! Direct methods: a call from the service side (the management API, later
//! the upstream link) is sent to the connected identity on
//! `$iothub/methods/POST/{name}/?$rid={rid}`, and the answer it publishes on
//! `$iothub/methods/res/{status}/?$rid={rid}` completes the call.
//!
//! As IoT Hub: a payload is at most 128 KiB, the response timeout is 5–300 s,
//! a target that is not connected (or not subscribed to methods) answers 404,
//! and one that stays silent 504.
//!
//! Owns: calls in flight and their request ids. Must not touch: the wire
//! (the broker queues the request on the identity's own session).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use edgehub_codec::{Props, QoS, Str};
use tokio::sync::oneshot;

use crate::broker::session::Message;
use crate::broker::{Broker, Targeted};

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
    #[error("{0} has not subscribed to direct methods ($iothub/methods/POST/#)")]
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
    broker: Arc<Broker>,
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
    pub fn new(broker: Arc<Broker>) -> Methods {
        Methods {
            broker,
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
        while !self.broker.is_connected(identity) {
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
        let msg = Arc::new(Message {
            topic: Str::from(format!("$iothub/methods/POST/{method}/?$rid={rid:x}")),
            payload,
            // IoT Hub sends method requests at QoS 0: a request is only
            // worth something while the caller still waits.
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Props::default(),
            expires_at: None,
            origin: None,
            delivered: None,
        });
        match self.broker.deliver_to(identity, msg) {
            Targeted::Queued => {}
            Targeted::NotSubscribed => return Err(MethodError::NotSubscribed(identity.into())),
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

    /// An answer published by `identity` on `$iothub/methods/res/…`.
    /// `false` when no call waits for it (unknown, late or another
    /// identity's request id).
    pub fn respond(&self, identity: &str, topic: &str, payload: Bytes) -> bool {
        let Some((status, rid)) = parse_response_topic(topic) else {
            return false;
        };
        match self.pending.remove(&(Arc::from(identity), rid)) {
            Some((_, tx)) => tx.send(MethodResponse { status, payload }).is_ok(),
            None => false,
        }
    }
}

/// `$iothub/methods/res/{status}/?$rid={rid}` → (status, rid).
fn parse_response_topic(topic: &str) -> Option<(i32, u64)> {
    let rest = topic.strip_prefix("$iothub/methods/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let rid = super::services::query_value(query, "$rid")?;
    Some((status, u64::from_str_radix(rid, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics_parse() {
        assert_eq!(
            parse_response_topic("$iothub/methods/res/200/?$rid=1f"),
            Some((200, 0x1f))
        );
        assert_eq!(
            parse_response_topic("$iothub/methods/res/-1/?$rid=2&x=y"),
            Some((-1, 2))
        );
        assert_eq!(parse_response_topic("$iothub/methods/res/200/"), None);
        assert_eq!(parse_response_topic("$iothub/methods/res/ok/?$rid=1"), None);
        assert!(valid_name("reboot") && !valid_name("a/b") && !valid_name(""));
    }
}
