//! `edgehub routes test` and `edgehub routes check`, run as a user would.

use std::process::Command;

fn edgehub(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(args)
        .output()
        .expect("run edgehub");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn routes_test_reports_match_condition_and_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let msg = write(
        &dir,
        "msg.json",
        r#"{"body": "{\"temp\": 35}", "properties": {"site": "north"},
            "systemProperties": {"contentType": "application/json", "contentEncoding": "utf-8"},
            "source": "/messages/modules/sensor/outputs/out1"}"#,
    );
    let (code, out, _) = edgehub(&[
        "routes",
        "test",
        "--route",
        "FROM /messages/modules/sensor/* WHERE $body.temp > 30 AND site = 'north' INTO BrokeredEndpoint(\"/modules/alert/inputs/hot\")",
        "--message",
        &msg,
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("condition: true"), "{out}");
    assert!(out.contains("matches:   yes"), "{out}");
    assert!(
        out.contains("BrokeredEndpoint(\"/modules/alert/inputs/hot\")"),
        "{out}"
    );
    // Undefined is shown as such, and is not a match.
    let (code, out, _) = edgehub(&[
        "routes",
        "test",
        "--route",
        "FROM /* WHERE missing = 'x' INTO $upstream",
        "--message",
        &msg,
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("condition: undefined"), "{out}");
    assert!(out.contains("matches:   no"), "{out}");
    // A bad route is an error with its position.
    let (code, _, err) = edgehub(&[
        "routes",
        "test",
        "--route",
        "FROM /* WHERE site > 1 INTO $upstream",
        "--message",
        &msg,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("at 1:20"), "{err}");
    // A base64 body and a bad message file.
    let b64 = write(
        &dir,
        "b64.json",
        r#"{"bodyBase64": "eyJ2IjogMX0=", "systemProperties": {"contentType": "application/json", "contentEncoding": "utf-8"}}"#,
    );
    let (_, out, _) = edgehub(&[
        "routes",
        "test",
        "--route",
        "FROM /messages WHERE $body.v = 1 INTO $upstream",
        "--message",
        &b64,
    ]);
    assert!(out.contains("matches:   yes"), "{out}");
    let bad = write(&dir, "bad.json", r#"{"properties": {"n": 5}}"#);
    let (code, _, err) = edgehub(&[
        "routes",
        "test",
        "--route",
        "FROM /* INTO $upstream",
        "--message",
        &bad,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("must be a string"), "{err}");
}

#[test]
fn routes_check_validates_a_deployment_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.json",
        r#"{"modulesContent": {"$edgeHub": {"properties.desired": {
            "schemaVersion": "1.1",
            "routes": {
                "up": "FROM /messages/* INTO $upstream",
                "hot": {"route": "FROM /messages/* WHERE $body.t > 1 INTO $upstream", "priority": 0, "timeToLiveSecs": 60}
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}}}"#,
    );
    let (code, out, _) = edgehub(&["routes", "check", &good]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 routes, all valid"), "{out}");
    assert!(
        out.contains("priority default (below 0-9), time-to-live 7200 s (global)"),
        "{out}"
    );
    assert!(out.contains("priority 0, time-to-live 60 s"), "{out}");
    assert!(!out.contains("warn"), "{out}");
    let diverging = write(
        &dir,
        "diverging.json",
        r#"{"schemaVersion": "1.1.0", "routes": {"ev": "FROM /messages/events INTO $upstream"},
            "storeAndForwardConfiguration": {}}"#,
    );
    let (code, out, _) = edgehub(&["routes", "check", &diverging]);
    assert_eq!(code, 0, "warnings are not errors: {out}");
    assert!(
        out.contains("warn  route 'ev': FROM /messages/events takes device telemetry"),
        "{out}"
    );
    assert!(
        out.contains("warn  storeAndForwardConfiguration has no timeToLiveSecs"),
        "{out}"
    );
    let bad = write(
        &dir,
        "bad.json",
        r#"{"schemaVersion": "1.0", "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
            "routes": {"a": "FROM /messages INTO nowhere", "b": "FROM /messages WHERE (x = 'y' INTO $upstream"}}"#,
    );
    let (code, out, _) = edgehub(&["routes", "check", &bad]);
    assert_eq!(code, 1);
    assert!(out.contains("error route 'a': invalid sink"), "{out}");
    assert!(
        out.contains("error route 'b': Syntax error: missing closing ')' at 1:22"),
        "{out}"
    );
    let unversioned = write(
        &dir,
        "unversioned.json",
        r#"{"routes": {"a": "FROM /* INTO $upstream"}}"#,
    );
    let (code, out, _) = edgehub(&["routes", "check", &unversioned]);
    assert_eq!(code, 1);
    assert!(out.contains("schemaVersion is missing"), "{out}");
}
