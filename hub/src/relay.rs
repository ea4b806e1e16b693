//! Cloud to edge: what the upstream link receives for a downstream identity
//! (C2D messages, desired properties, direct method calls, twin answers)
//! handed to the local layers, and the reported properties it must pass up.
//!
//! Owns: the mapping from upstream traffic to local services. Must not
//! touch: connections (the upstream link) or sessions (the broker); twin
//! changes run on the twin worker, in order with the devices' own requests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgehub_router::Message;
use serde_json::{Map, Value};
use tracing::warn;

use crate::endpoints::{C2dExecutors, C2D_DEFAULT_TTL_SECS};
use crate::upstream::{BoxFut, CloudToEdge};
use edgehub_device::DeviceLayer;

/// How long a relayed method call waits for the device. The caller upstream
/// has its own timeout (at most 300 s); a late answer is of no use to it.
const RELAYED_METHOD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Relay {
    pub devices: Arc<DeviceLayer>,
    pub c2d: Arc<C2dExecutors>,
}

impl Relay {
    fn twin_job(
        &self,
        identity: &str,
        what: &'static str,
        job: impl FnOnce(&DeviceLayer, &str) -> Result<Option<Value>, edgehub_device::twin::TwinError>
            + Send
            + 'static,
    ) {
        let (s, id) = (self.devices.clone(), identity.to_owned());
        self.devices.run_twin_job(move || match job(&s, &id) {
            Ok(Some(push)) => s.push_desired(&id, &push),
            Ok(None) => {}
            Err(e) => warn!(identity = %id, error = %e, "{what} from upstream not applied"),
        });
    }
}

impl CloudToEdge for Relay {
    fn c2d(&self, device: &str, msg: Message) -> BoxFut<Result<(), String>> {
        let (c2d, device) = (self.c2d.clone(), device.to_owned());
        Box::pin(async move {
            c2d.enqueue(&device, msg, C2D_DEFAULT_TTL_SECS)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    fn adopt_desired(&self, identity: &str, desired: Map<String, Value>) {
        self.twin_job(identity, "twin", move |s, id| {
            s.twins.adopt_upstream_desired(id, desired)
        });
    }

    fn desired_patch(&self, identity: &str, patch: Map<String, Value>) {
        self.twin_job(identity, "desired properties patch", move |s, id| {
            s.twins.apply_upstream_desired_patch(id, patch).map(Some)
        });
    }

    fn method(&self, identity: &str, name: &str, payload: Bytes) -> BoxFut<(i32, Bytes)> {
        let (s, id, name) = (self.devices.clone(), identity.to_owned(), name.to_owned());
        Box::pin(async move {
            match s
                .methods
                .invoke(&id, &name, payload, RELAYED_METHOD_TIMEOUT, Duration::ZERO)
                .await
            {
                Ok(r) => (r.status, r.payload),
                Err(e) => (
                    e.status() as i32,
                    Bytes::from(
                        edgehub_device::error::error_body(e.code(), &e.to_string()).to_string(),
                    ),
                ),
            }
        })
    }

    fn reported_to_sync(
        &self,
        identity: &str,
    ) -> BoxFut<Option<edgehub_device::twin::ReportedSync>> {
        let (s, id) = (self.devices.clone(), identity.to_owned());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.devices.run_twin_job(move || {
            let r = s.twins.reported_to_sync(&id).unwrap_or_else(|e| {
                warn!(identity = %id, error = %e, "reading reported properties to sync");
                None
            });
            let _ = tx.send(r);
        });
        Box::pin(async move { rx.await.ok().flatten() })
    }

    fn reported_synced(&self, identity: &str, snapshot: Map<String, Value>) {
        let (s, id) = (self.devices.clone(), identity.to_owned());
        self.devices.run_twin_job(move || {
            if let Err(e) = s.twins.reported_synced(&id, snapshot) {
                warn!(identity = %id, error = %e, "recording the reported-properties sync");
            }
        });
    }
}
