//! Which IoT Hub identities are connected and when each was last active
//! (connected or disconnected), for the twin document's `connectionState`
//! and `lastActivityTime`. Fed by the broker's presence hook: one map write
//! per connect and disconnect, nothing per message.
//!
//! Only registered identities are kept (generic MQTT clients may use any
//! number of client ids); a deleted identity's entry goes with it.

use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

/// IoT Hub's "never" for a time stamp.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

#[derive(Default)]
pub struct Presence {
    /// Lower-cased identity name → (connected, last activity in unix ms).
    seen: DashMap<String, (bool, u64)>,
}

impl Presence {
    /// `identity` (its session key) connected (`true`) or left (`false`).
    pub fn record(&self, identity: &str, connected: bool) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.seen.insert(identity.to_lowercase(), (connected, now));
    }

    pub fn forget(&self, identity: &str) {
        self.seen.remove(&identity.to_lowercase());
    }

    /// `("Connected" | "Disconnected", lastActivityTime)` as IoT Hub writes them.
    pub fn state(&self, identity: &str) -> (&'static str, String) {
        match self.seen.get(&identity.to_lowercase()).map(|e| *e) {
            Some((connected, ms)) => (
                if connected {
                    "Connected"
                } else {
                    "Disconnected"
                },
                rfc3339_ms(ms),
            ),
            None => ("Disconnected", NEVER.to_owned()),
        }
    }
}

/// Now, in milliseconds since the epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A unix time in milliseconds as RFC 3339 UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| NEVER.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_state_follows_the_last_event() {
        let p = Presence::default();
        assert_eq!(p.state("dev1"), ("Disconnected", NEVER.to_owned()));
        p.record("Dev1", true);
        let (s, t) = p.state("dev1");
        assert_eq!(s, "Connected");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
        p.record("dev1", false);
        assert_eq!(p.state("DEV1").0, "Disconnected");
        assert_ne!(p.state("dev1").1, NEVER);
        p.forget("dev1");
        assert_eq!(p.state("dev1").1, NEVER);
    }
}
