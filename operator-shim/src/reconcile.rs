//! The controller: EdgeDeployment → objects in its namespace.
//!
//! Every pass translates the whole spec, applies each object with
//! server-side apply under one field manager (`edgehub-operator`, forced:
//! this operator owns these fields), deletes the objects of this
//! EdgeDeployment that the spec no longer names, and writes the status.
//! Applying an unchanged object changes nothing on the server, so a second
//! pass is a no-op. Every object carries an owner reference to the
//! EdgeDeployment, so deleting it lets Kubernetes' garbage collector remove
//! the rest. A spec that cannot be translated changes no object: the status
//! gets `Ready=False` with the reason and a Warning event says why.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crd::{Condition, EdgeDeployment, EdgeDeploymentStatus, ModuleStatus};
use crate::names;
use crate::translate::{self, Plan, Target, LABEL_DEPLOYMENT, MANAGED_BY};

pub const FIELD_MANAGER: &str = "edgehub-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("EdgeDeployment has no namespace")]
    NoNamespace,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// The hub is installed by other means (the chart): leave `edgeHub` be.
    pub external_hub: bool,
}

impl Context {
    pub fn new(client: Client, external_hub: bool) -> Arc<Context> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGED_BY.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Context {
            client,
            recorder,
            external_hub,
        })
    }
}

/// Runs the controller until `shutdown` resolves. `namespace`: watch only
/// that namespace (what a namespaced Role allows), else all.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    external_hub: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (deployments, owned): (Api<EdgeDeployment>, Api<Deployment>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctx = Context::new(client, external_hub);
    Controller::new(deployments, watcher::Config::default())
        .owns(
            owned,
            watcher::Config::default()
                .labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => {
                    tracing::debug!(name = %obj.name, ns = ?obj.namespace, "reconciled")
                }
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(_: Arc<EdgeDeployment>, e: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "will retry");
    Action::requeue(Duration::from_secs(10))
}

pub async fn reconcile(ed: Arc<EdgeDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ed.namespace().ok_or(Error::NoNamespace)?;
    let name = ed.name_any();
    let target = Target {
        owner: &name,
        namespace: &ns,
        external_hub: ctx.external_hub,
    };
    let plan = match translate::plan(&ed.spec, &target) {
        Ok(p) => p,
        Err(e) => {
            let why = e.to_string();
            tracing::warn!(%ns, %name, %why, "invalid EdgeDeployment; running objects left alone");
            let status = not_ready(&ctx, &ed, "InvalidManifest", &why).await;
            write_status(&ctx.client, &ed, status).await?;
            return Ok(Action::await_change());
        }
    };
    match apply_plan(&ctx.client, &ed, &ns, &plan).await {
        Ok(mut deployments) => {
            if ctx.external_hub {
                // Not ours to change, but its status is the module's.
                let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
                if let Some(hub) = api.get_opt(&names::sanitize(translate::EDGE_HUB)).await? {
                    deployments.push(hub);
                }
            }
            let status = status_after_apply(&ed, &plan, &deployments);
            for (module, (_, unsupported)) in &plan.modules {
                if !unsupported.is_empty() {
                    let note = format!(
                        "module {module}: not supported, ignored: {}",
                        unsupported.join("; ")
                    );
                    warn(&ctx, &ed, "UnsupportedCreateOptions", &note).await;
                }
            }
            write_status(&ctx.client, &ed, status).await?;
            Ok(Action::requeue(Duration::from_secs(300)))
        }
        Err(e) => {
            let why = e.to_string();
            let status = not_ready(&ctx, &ed, "ApplyFailed", &why).await;
            // Best effort: the apply error is the one worth returning.
            let _ = write_status(&ctx.client, &ed, status).await;
            Err(e)
        }
    }
}

/// A Warning event and the status with `Ready=False` for `reason`.
async fn not_ready(
    ctx: &Context,
    ed: &EdgeDeployment,
    reason: &str,
    why: &str,
) -> EdgeDeploymentStatus {
    warn(ctx, ed, reason, why).await;
    let mut status = ed.status.clone().unwrap_or_default();
    set_condition(
        &mut status,
        ed.metadata.generation,
        "Ready",
        false,
        reason,
        why,
    );
    status
}

async fn warn(ctx: &Context, ed: &EdgeDeployment, reason: &str, note: &str) {
    let ev = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &ed.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record event");
    }
}

/// Applies every object of `plan`, then deletes this EdgeDeployment's
/// objects the plan no longer has. Returns the applied Deployments (with
/// the status the server holds).
pub async fn apply_plan(
    client: &Client,
    ed: &EdgeDeployment,
    ns: &str,
    plan: &Plan,
) -> Result<Vec<Deployment>, Error> {
    let owner = ed
        .controller_owner_ref(&())
        .expect("an EdgeDeployment read from the API has a name and uid");
    let uid = owner.uid.clone();
    let own = |mut meta: ObjectMeta| {
        meta.owner_references = Some(vec![owner.clone()]);
        meta
    };
    let selector = format!("{LABEL_DEPLOYMENT}={}", names::label_value(&ed.name_any()));

    // Claims and accounts before the Deployments that use them.
    let ours = Ours {
        client,
        ns,
        selector: &selector,
        uid: &uid,
    };
    ours.sync(&plan.claims, &own).await?;
    ours.sync(&plan.config_maps, &own).await?;
    ours.sync(&plan.service_accounts, &own).await?;
    let applied = ours.sync(&plan.deployments, &own).await?;
    ours.sync(&plan.services, &own).await?;
    Ok(applied)
}

/// This EdgeDeployment's objects of one kind in its namespace.
struct Ours<'a> {
    client: &'a Client,
    ns: &'a str,
    selector: &'a str,
    uid: &'a str,
}

impl Ours<'_> {
    /// Applies `objects` (owned by the EdgeDeployment) and deletes the
    /// others of that kind it owns; returns them as applied.
    async fn sync<K>(
        &self,
        objects: &[K],
        own: &impl Fn(ObjectMeta) -> ObjectMeta,
    ) -> Result<Vec<K>, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Serialize
            + DeserializeOwned
            + Clone
            + Debug,
    {
        let mut keep = BTreeSet::new();
        let mut applied = Vec::with_capacity(objects.len());
        for o in objects {
            let mut o = o.clone();
            let meta = std::mem::take(o.meta_mut());
            *o.meta_mut() = own(meta);
            let o = apply(self.client, self.ns, &o).await?;
            keep.insert(o.name_any());
            applied.push(o);
        }
        prune::<K>(self.client, self.ns, self.selector, &keep, self.uid).await?;
        Ok(applied)
    }
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// Deletes the objects labelled as this EdgeDeployment's (and owned by this
/// very one: a recreated EdgeDeployment of the same name has another uid)
/// that are not in `keep`.
async fn prune<K>(
    client: &Client,
    ns: &str,
    selector: &str,
    keep: &BTreeSet<String>,
    owner_uid: &str,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    for obj in api.list(&ListParams::default().labels(selector)).await? {
        let name = obj.name_any();
        let ours = obj.owner_references().iter().any(|o| o.uid == owner_uid);
        if ours && !keep.contains(&name) && obj.meta().deletion_timestamp.is_none() {
            tracing::info!(kind = K::kind(&()).as_ref(), %ns, %name, "removing object no longer in the deployment");
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// IoT Edge's `runtimeStatus` for a module's Deployment.
pub fn runtime_status(d: &Deployment) -> &'static str {
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if wanted == 0 {
        return "stopped";
    }
    match &d.status {
        Some(s) if s.ready_replicas.unwrap_or(0) >= 1 => "running",
        Some(s) if s.observed_generation.is_some() || s.replicas.is_some() => "backoff",
        _ => "unknown",
    }
}

fn status_after_apply(
    ed: &EdgeDeployment,
    plan: &Plan,
    deployments: &[Deployment],
) -> EdgeDeploymentStatus {
    let by_name: BTreeMap<String, &Deployment> =
        deployments.iter().map(|d| (d.name_any(), d)).collect();
    let mut status = ed.status.clone().unwrap_or_default();
    status.modules = plan
        .modules
        .iter()
        .map(|(module, (k8s, unsupported))| {
            let runtime = by_name.get(k8s).map_or("unknown", |d| runtime_status(d));
            (
                module.clone(),
                ModuleStatus {
                    name: k8s.clone(),
                    runtime_status: runtime.to_owned(),
                    unsupported: unsupported.clone(),
                },
            )
        })
        .collect();
    let gen = ed.metadata.generation;
    let message = format!("{} modules applied", plan.modules.len());
    set_condition(&mut status, gen, "Ready", true, "Applied", &message);
    let unsupported: Vec<String> = plan
        .modules
        .iter()
        .filter(|(_, (_, u))| !u.is_empty())
        .map(|(m, (_, u))| format!("{m}: {}", u.join("; ")))
        .collect();
    if unsupported.is_empty() {
        set_condition(&mut status, gen, "UnsupportedOptions", false, "None", "");
    } else {
        set_condition(
            &mut status,
            gen,
            "UnsupportedOptions",
            true,
            "Ignored",
            &unsupported.join(" | "),
        );
    }
    status.observed_generation = gen;
    status
}

pub fn set_condition(
    status: &mut EdgeDeploymentStatus,
    generation: Option<i64>,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
) {
    let value = if ok { "True" } else { "False" };
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let existing = status
        .conditions
        .iter_mut()
        .find(|c| c.condition_type == kind);
    match existing {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = Some(now);
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = (!message.is_empty()).then(|| message.into());
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            condition_type: kind.into(),
            status: value.into(),
            reason: reason.into(),
            message: (!message.is_empty()).then(|| message.into()),
            last_transition_time: Some(now),
            observed_generation: generation,
        }),
    }
}

async fn write_status(
    client: &Client,
    ed: &EdgeDeployment,
    status: EdgeDeploymentStatus,
) -> Result<(), kube::Error> {
    if ed.status.as_ref() == Some(&status) {
        return Ok(()); // unchanged: no write, so no new watch event
    }
    let api: Api<EdgeDeployment> =
        Api::namespaced(client.clone(), &ed.namespace().unwrap_or_default());
    let mut patch = serde_json::json!({ "status": status });
    // A merge patch keeps map keys it does not mention: modules gone from
    // the spec must be removed explicitly.
    for gone in ed.status.iter().flat_map(|s| s.modules.keys()) {
        if !status.modules.contains_key(gone) {
            patch["status"]["modules"][gone] = serde_json::Value::Null;
        }
    }
    api.patch_status(
        &ed.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}
