//! Shared by the integration tests: the test cluster, a namespace per test
//! with a controller watching it, polling with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use edgehub_operator::crd::EdgeDeployment;
use edgehub_operator::reconcile;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};
use serde_json::json;

pub async fn cluster() -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        assert!(
            std::env::var_os("EDGEHUB_REQUIRE_CLUSTER").is_none(),
            "EDGEHUB_REQUIRE_CLUSTER is set but KUBECONFIG is not: no test cluster"
        );
        eprintln!("skipped: no KUBECONFIG (scripts/k8s-test-cluster start DIR)");
        return None;
    }
    let client = Client::try_default().await.expect("KUBECONFIG is usable");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "edgedeployments.microsoft.azure.devices.edge",
        &PatchParams::apply("edgehub-operator-tests").force(),
        &Patch::Apply(EdgeDeployment::crd()),
    )
    .await
    .expect("CRD applied");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            crds,
            "edgedeployments.microsoft.azure.devices.edge",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD established in 30 s")
    .unwrap();
    Some(client)
}

/// A fresh namespace, and a controller watching only it (as a namespaced
/// Role allows).
pub struct Scope {
    pub client: Client,
    pub ns: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Scope {
    pub async fn new(client: Client, prefix: &str) -> Scope {
        let ns = format!("{prefix}-{:08x}", rand_u32());
        let nss: Api<Namespace> = Api::all(client.clone());
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(reconcile::run(
            client.clone(),
            Some(ns.clone()),
            false,
            async move {
                let _ = rx.await;
            },
        ));
        Scope {
            client,
            ns,
            stop: Some(tx),
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn end(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let nss: Api<Namespace> = Api::all(self.client.clone());
        let _ = nss.delete(&self.ns, &DeleteParams::default()).await;
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

/// Polls `check` until it gives `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
