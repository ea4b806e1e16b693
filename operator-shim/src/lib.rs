//! `edgehub-operator`: turns IoT Edge deployments into Kubernetes objects.
//!
//! - [`crd`]: the `EdgeDeployment` custom resource.
//! - [`manifest`]: IoT Edge deployment manifests → `EdgeDeploymentSpec`.
//! - [`translate`]: spec → Deployments, Services, ServiceAccounts, PVCs
//!   (pure).
//! - [`reconcile`]: applies a plan with server-side apply, prunes what the
//!   spec no longer names, writes status conditions and events.
//! - [`agent`]: the cloud-managed path: connects to the hub as `$edgeAgent`,
//!   turns its desired properties into an EdgeDeployment and reports module
//!   status back as reported properties.
//!
//! Owns: the Kubernetes side of a deployment. Must not touch: the hub's
//! internals; it talks to the hub over MQTT (and the hub's management API
//! in tests) only.

pub mod agent;
pub mod crd;
pub mod manifest;
pub mod names;
pub mod reconcile;
pub mod translate;
