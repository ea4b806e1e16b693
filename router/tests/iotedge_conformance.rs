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

fn run(text: &str, msg: &Message, at_least: usize) {
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
            Ok(c) => match c.evaluate(msg) {
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
    assert!(count >= at_least, "only {count} vectors read");
    assert!(
        failures.is_empty(),
        "{} of {count} vectors fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn iotedge_condition_vectors() {
    run(
        include_str!("conformance/iotedge-conditions.tsv"),
        &message(),
        390,
    );
}

const WEATHER: &str = r#"{"message": {"Weather": {"Temperature": 50, "FreezingTemperature": -50.4,
  "PreciseTemperature": 50.4, "Temperature_PropertyConflict": 50, "NullValue": null,
  "Time": "2017-03-09T00:00:00.000Z", "PrevTemperatures": [20, 30, 40], "IsEnabled": true,
  "IsDisabled": false, "Location": {"Street": "One Microsoft Way", "City": "Redmond", "State": "WA"},
  "HistoricalData": [{"Month": "Feb", "Temperature": 40}, {"Month": "Jan", "Temperature": 30}]}}}"#;

#[test]
fn iotedge_body_query_vectors() {
    let mut m = Message::new(WEATHER)
        .with_property("City", "Redmond")
        .with_property("$State", "WA")
        .with_property("$body.message.Weather.Temperature_PropertyConflict", "100")
        .with_property("IntegerProperty", "110");
    m.set_system_named("State", "CA");
    m.set_system_named("$body.message.Weather.Location.State", "CA");
    m.set_system_named("contentEncoding", "UTF-8");
    m.set_system_named("contentType", "application/json");
    run(include_str!("conformance/iotedge-body-queries.tsv"), &m, 80);
}
