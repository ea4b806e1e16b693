//! Runs `conformance/iotedge-conditions.tsv`: condition vectors from IoT Edge's
//! own test suite, each compiled and evaluated against one fixed message.

use edgehub_router::{Condition, Message};

fn message() -> Message {
    let mut m = Message::new(Vec::new())
        .with_property("key1", "value1")
        .with_property("key2", "3")
        .with_property("key3", "VALUE3")
        .with_property("$sys4", "value4");
    for (k, v) in [
        ("sys1", "sysvalue1"),
        ("sys2", "4"),
        ("sys3", "SYSVALUE3"),
        ("sys4", "sysvalue4"),
    ] {
        m.set_system_named(k, v);
    }
    m
}

#[test]
fn iotedge_condition_vectors() {
    let text = include_str!("conformance/iotedge-conditions.tsv");
    let msg = message();
    let mut failures = Vec::new();
    let mut count = 0;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        let (expected, cond) = line.split_once('\t').expect("expected<TAB>condition");
        count += 1;
        let got = match Condition::compile(cond) {
            Err(_) => "error",
            Ok(c) => match c.evaluate(&msg) {
                Some(true) => "true",
                Some(false) => "false",
                None => "undefined",
            },
        };
        if got != expected {
            failures.push(format!(
                "line {}: {cond:?}: expected {expected}, got {got}",
                n + 1
            ));
        }
    }
    assert!(count > 300, "only {count} vectors read");
    assert!(
        failures.is_empty(),
        "{} of {count} vectors fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
