"""The Helm chart, the ingress examples and the operator's generated objects:
linted and rendered with the Helm v4 SDK (helm-python-sdk), validated against
Kubernetes 1.33 schemas (kubernetes-validate, strict: unknown fields fail), and
applied with --dry-run=server to the real test API server.

Needs EDGEHUB_OPERATOR_BIN (the operator binary, for `translate`) and, for
the server dry run, KUBECONFIG (scripts/k8s-test-cluster); with
EDGEHUB_REQUIRE_CLUSTER=1 (CI) a missing cluster fails instead of skipping.
"""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "edgehub"
K8S_SCHEMA = "1.33.0"
NAMESPACE = "msiot-myhub-edge1"

VALUE_SETS = {
    "defaults": {},
    "cloud-managed": {
        "device": {"id": "edge1", "iothubHostname": "myhub.azure-devices.net"},
        "hub": {
            "upstream": "mqtts://myhub.azure-devices.net:8883",
            "upstreamCaSecret": "upstream-ca",
            "tlsSecret": "edgehub-tls",
            "managementTokenSecret": "edgehub-token",
            "storeMaxBytes": "8GiB",
            "durability": "os-buffered",
        },
        "service": {"type": "LoadBalancer", "loadBalancerIP": "192.0.2.10"},
        "persistence": {"storageClassName": "local-path", "size": "20Gi"},
        "operator": {"edgeAgentSecret": "edge-agent"},
    },
    "hub-only": {"operator": {"enabled": False}, "persistence": {"existingClaim": "my-claim"}},
    "nested": {
        "device": {"id": "child-edge", "connectionStringSecret": "child-edge-identity"},
        "hub": {"upstream": "mqtts://parent.example:8883", "upstreamAuth": "chain",
                "parentDeviceId": "parent-edge", "upstreamCaSecret": "parent-ca"},
    },
}


def render(values):
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="edge1", namespace=NAMESPACE)
    finally:
        chart.close()
    docs = []
    for text in out.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def validate_all(docs):
    for d in docs:
        kubernetes_validate.validate(d, K8S_SCHEMA, strict=True)


def test_lint_is_clean():
    result = helm_python.lint(str(CHART), strict=True, namespace=NAMESPACE)
    assert result["errors"] == [], result


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_renders_valid_manifests(name):
    docs = render(VALUE_SETS[name])
    validate_all(docs)
    hub = by_kind(docs, "Deployment", "edgehub")
    assert hub["spec"]["replicas"] == 1
    assert hub["spec"]["strategy"] == {"type": "Recreate"}, "one RocksDB writer"
    c = hub["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--data-dir=/data" in c["args"]
    claim = hub["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    if name == "hub-only":
        assert claim == "my-claim"
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert not [d for d in docs if "operator" in d["metadata"]["name"]]
    else:
        assert by_kind(docs, "PersistentVolumeClaim", claim)
    svc = by_kind(docs, "Service", "edgehub")
    assert [(p["port"], p["protocol"]) for p in svc["spec"]["ports"]] == [(8883, "TCP"), (5671, "TCP")]
    # The hub gets no Kubernetes rights.
    assert by_kind(docs, "ServiceAccount", "edgehub")["automountServiceAccountToken"] is False


def test_cloud_managed_values_reach_the_pods():
    docs = render(VALUE_SETS["cloud-managed"])
    c = by_kind(docs, "Deployment", "edgehub")["spec"]["template"]["spec"]["containers"][0]
    for arg in ["--upstream=mqtts://myhub.azure-devices.net:8883", "--iothub-hostname=myhub.azure-devices.net",
                "--upstream-ca=/etc/edgehub/upstream/ca.pem", "--tls-cert=/etc/edgehub/tls/tls.crt",
                "--store-max-bytes=8GiB", "--durability=os-buffered", "--device-id=edge1"]:
        assert arg in c["args"], arg
    assert by_kind(docs, "Service", "edgehub")["spec"]["type"] == "LoadBalancer"
    op = by_kind(docs, "Deployment", "edgehub-operator")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in op["env"]}
    assert env["EDGEHUB_EDGE_AGENT_CONNECTION_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "edge-agent"
    assert env["EDGEHUB_CA"]["value"] == "/etc/edgehub/tls/ca.crt"
    assert env["EDGEHUB_OPERATOR_NAMESPACE"]["value"] == NAMESPACE
    assert env["EDGEHUB_EXTERNAL_HUB"]["value"] == "true", "the chart's hub is not the operator's"


def test_operator_rbac_is_namespaced_and_minimal():
    docs = render({})
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = by_kind(docs, "Role", "edgehub-operator")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"edgedeployments", "edgedeployments/status", "deployments", "services",
                         "serviceaccounts", "persistentvolumeclaims", "configmaps", "events"}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]


def test_nested_values_reach_the_hub():
    docs = render(VALUE_SETS["nested"])
    c = by_kind(docs, "Deployment", "edgehub")["spec"]["template"]["spec"]["containers"][0]
    assert "--upstream-auth=chain" in c["args"] and "--parent-device-id=parent-edge" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["EDGEHUB_CONNECTION_STRING"]["valueFrom"]["secretKeyRef"] == {
        "name": "child-edge-identity", "key": "connectionString"}
    with pytest.raises(Exception, match="device.connectionStringSecret"):
        render({"hub": {"upstream": "mqtts://p:8883", "upstreamAuth": "chain"}})


def test_cloud_managed_without_tls_secret_is_refused():
    with pytest.raises(Exception, match="needs hub.tlsSecret"):
        render({"operator": {"edgeAgentSecret": "edge-agent"}})


def test_validator_catches_a_misspelt_field():
    # The check above must be able to fail.
    docs = render({})
    hub = by_kind(docs, "Deployment", "edgehub")
    port = hub["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    port["contianerPort"] = port.pop("containerPort")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hub, K8S_SCHEMA, strict=True)


def example_docs():
    docs = []
    for f in sorted((REPO / "deploy" / "ingress").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_ingress_examples_are_valid():
    docs = example_docs()
    assert len(docs) >= 4
    validate_all(docs)


def operator_bin():
    b = os.environ.get("EDGEHUB_OPERATOR_BIN")
    if not b:
        if os.environ.get("EDGEHUB_REQUIRE_CLUSTER"):
            pytest.fail("EDGEHUB_OPERATOR_BIN is not set")
        pytest.skip("EDGEHUB_OPERATOR_BIN is not set")
    return b


@pytest.mark.parametrize("example", ["deployment.json", "edgedeployment.yaml"])
def test_operator_output_is_valid(example):
    out = subprocess.run([operator_bin(), "translate", str(REPO / "deploy" / "examples" / example),
                          "--namespace", NAMESPACE], check=True, capture_output=True, text=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"], kinds
    validate_all(docs)


def kubectl():
    if not os.environ.get("KUBECONFIG"):
        if os.environ.get("EDGEHUB_REQUIRE_CLUSTER"):
            pytest.fail("EDGEHUB_REQUIRE_CLUSTER is set but KUBECONFIG is not")
        pytest.skip("no KUBECONFIG (scripts/k8s-test-cluster start DIR)")
    k = shutil.which("kubectl")
    assert k, "kubectl is needed for the server-side dry run"
    return k


def test_dry_run_on_the_api_server(tmp_path):
    k = kubectl()
    ns = f"chart-{uuid.uuid4().hex[:8]}"
    run = lambda *a, **kw: subprocess.run([k, *a], capture_output=True, text=True, **kw)  # noqa: E731
    r = run("apply", "--server-side", "-f", str(CHART / "crds" / "edgedeployment.yaml"))
    assert r.returncode == 0, r.stderr
    r = run("wait", "--for", "condition=established", "--timeout=30s",
            "crd/edgedeployments.microsoft.azure.devices.edge")
    assert r.returncode == 0, r.stderr
    assert run("create", "namespace", ns).returncode == 0
    try:
        for name, values in VALUE_SETS.items():
            f = tmp_path / f"{name}.yaml"
            f.write_text(yaml.safe_dump_all(render(values)))
            r = run("apply", "--dry-run=server", "-n", ns, "-f", str(f))
            assert r.returncode == 0, f"{name}: {r.stderr}"
        example = (REPO / "deploy" / "examples" / "edgedeployment.yaml").read_text().replace(NAMESPACE, ns)
        f = tmp_path / "edgedeployment.yaml"
        f.write_text(example)
        r = run("apply", "--dry-run=server", "-f", str(f))
        assert r.returncode == 0, r.stderr
        # The server itself refuses what does not fit the schema.
        bad = yaml.safe_load(example)
        bad["spec"]["modules"]["edgeHub"]["settings"] = {"createOptions": "{}"}  # no image
        f.write_text(yaml.safe_dump(bad))
        r = run("apply", "--dry-run=server", "-f", str(f))
        assert r.returncode != 0 and "image" in r.stderr, r.stderr
    finally:
        run("delete", "namespace", ns, "--wait=false")
