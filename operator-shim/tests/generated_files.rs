//! The CRD the chart installs is generated from the Rust types; this fails
//! when the committed copy no longer matches them (regenerate with
//! `cargo run -- crd > ../deploy/helm/edgehub/crds/edgedeployment.yaml`).

#[test]
fn chart_crd_is_the_generated_one() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/edgehub/crds/edgedeployment.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("chart CRD exists");
    assert!(
        committed == edgehub_operator::crd::crd_yaml(),
        "{path} is stale: regenerate it with `cargo run -- crd > {path}`"
    );
}
