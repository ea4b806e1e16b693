use super::*;
use crate::message::{Message, MessageSource, SystemProperty};

fn module_output(m: &str, o: &str) -> Message {
    Message::new("x").with_source(MessageSource::ModuleOutput {
        module: m.into(),
        output: o.into(),
    })
}

#[test]
fn route_syntax() {
    let r = Route::parse(
        "r",
        "SELECT * FROM /messages/* WHERE temp = '1' INTO $upstream",
    )
    .unwrap();
    assert_eq!(r.endpoint, Endpoint::Upstream);
    assert!(r.condition.is_some());
    let r = Route::parse(
        "r",
        "from /messages/modules/m1/outputs/o1 into BrokeredEndpoint(\"/modules/m2/inputs/i1\")",
    )
    .unwrap();
    assert_eq!(
        r.endpoint,
        Endpoint::ModuleInput {
            module: "m2".into(),
            input: "i1".into()
        }
    );
    assert!(r.condition.is_none());
    // INTO inside a string literal is not the keyword.
    let r = Route::parse("r", "FROM /* WHERE note = 'INTO the void' INTO $upstream").unwrap();
    let m = Message::new("x").with_property("note", "INTO the void");
    assert!(r.matches(&m));
}

#[test]
fn route_errors_are_positioned() {
    let e = |t: &str| Route::parse("r", t).unwrap_err().to_string();
    assert_eq!(
        e("FROM /messages/* WHERE a = 'b'"),
        "route 'r': Syntax error: expected INTO at 1:31"
    );
    assert_eq!(
        e("FRM /messages INTO $upstream"),
        "route 'r': Syntax error: expected FROM at 1:1"
    );
    assert!(e("FROM / INTO $upstream").starts_with("route 'r': invalid source '/'"));
    assert!(e("FROM /messages/ INTO $upstream").contains("invalid source"));
    assert!(e("FROM messages INTO $upstream").contains("invalid source"));
    assert!(e("FROM /messages INTO $elsewhere")
        .contains("system endpoint '$elsewhere' is not supported"));
    assert!(e("FROM /messages INTO Elsewhere(\"/modules/m/inputs/i\")")
        .contains("function endpoint 'Elsewhere' is not supported"));
    assert!(
        e("FROM /messages INTO BrokeredEndpoint(\"/modules/m\")").contains("could not be parsed")
    );
    assert!(
        e("FROM /messages INTO BrokeredEndpoint(\"/modules//inputs/i\")")
            .contains("names no module")
    );
    // Condition errors point into the route text.
    assert_eq!(
        e("FROM /messages WHERE temp > 5 INTO $upstream"),
        "route 'r': Invalid operands to binary operator '>': have 'string' and 'number', expected 'string' and 'string' at 1:27"
    );
    assert_eq!(
        e("FROM /messages\nWHERE (a = 'b' INTO $upstream"),
        "route 'r': Syntax error: missing closing ')' at 2:7"
    );
    assert!(e("FROM /messages WHERE INTO $upstream").contains("expected a condition"));
}

#[test]
fn sources_match_as_iot_edge_prefixes() {
    let src = |s: &str| Source::parse(s).unwrap_or_else(|| panic!("{s}"));
    let telemetry = Message::new("x");
    let m1 = module_output("m1", "out");
    let m10 = module_output("m10", "out");
    let no_output = module_output("m1", "");
    let twin = Message::new("{}").with_source(MessageSource::TwinChangeNotification);
    assert!(src("/*").matches(telemetry.source.as_ref()));
    assert!(src("/*").matches(twin.source.as_ref()));
    assert!(src("/messages").matches(telemetry.source.as_ref()));
    assert!(src("/messages/events").matches(telemetry.source.as_ref()));
    assert!(src("/messages/*").matches(m1.source.as_ref()));
    assert!(!src("/messages/*").matches(twin.source.as_ref()));
    assert!(!src("/messages/modules/*").matches(telemetry.source.as_ref()));
    assert!(src("/messages/modules/m1").matches(m1.source.as_ref()));
    assert!(src("/MESSAGES/Modules/m1/outputs/*").matches(m1.source.as_ref()));
    assert!(src("/messages/modules/m1*").matches(m1.source.as_ref()));
    assert!(!src("/messages/modules/m1*").matches(m10.source.as_ref()));
    assert!(src("/messages/modules/m1/outputs/out").matches(m1.source.as_ref()));
    assert!(!src("/messages/modules/m1/outputs/other").matches(m1.source.as_ref()));
    assert!(src("/twinChangeNotifications").matches(twin.source.as_ref()));
    // A module message without an output name is the module's, under no output.
    assert!(src("/messages/modules/m1").matches(no_output.source.as_ref()));
    assert!(src("/messages/modules/m1/*").matches(no_output.source.as_ref()));
    assert!(!src("/messages/modules/m1/outputs/*").matches(no_output.source.as_ref()));
    // Any path the grammar takes is valid; it matches what it matches.
    assert!(!src("/devices").matches(telemetry.source.as_ref()));
    assert!(!src("/messages/modules/m1/inputs/x").matches(m1.source.as_ref()));
    for bad in [
        "messages",
        "/",
        "/messages/",
        "//messages",
        "/messages//x",
        "/a(b",
    ] {
        assert!(Source::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn fan_out_dedups_per_endpoint_lowest_priority_wins() {
    let desired = serde_json::json!({
        "schemaVersion": "1.1",
        "routes": {
            "all": "FROM /messages/* INTO $upstream",
            "hot": {"route": "FROM /messages/* WHERE $body.temp > 30 INTO $upstream", "priority": 0, "timeToLiveSecs": 60},
            "warm": {"route": "FROM /messages/* WHERE $body.temp > 20 INTO $upstream", "priority": 3, "timeToLiveSecs": 600},
            "toFilter": "FROM /messages/modules/sensor/outputs/* INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")"
        },
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
    });
    let t = RouteTable::from_edge_hub_desired(&desired).unwrap();
    let msg = |temp: f64| {
        Message::new(format!("{{\"temp\": {temp}}}"))
            .with_system(SystemProperty::ContentType, "application/json")
            .with_system(SystemProperty::ContentEncoding, "utf-8")
            .with_source(MessageSource::ModuleOutput {
                module: "sensor".into(),
                output: "out".into(),
            })
    };
    let mut d = t.route(&msg(35.0));
    d.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    assert_eq!(d.len(), 2, "one decision per endpoint: {d:?}");
    assert_eq!(
        (d[0].priority, d[0].time_to_live_secs, d[0].route.as_str()),
        (0, Some(60), "hot")
    );
    assert_eq!(d[1].priority, DEFAULT_PRIORITY);
    assert_eq!(
        d[1].time_to_live_secs,
        Some(7200),
        "string routes take the global TTL"
    );
    let d = t.route(&msg(25.0));
    let up = d.iter().find(|d| d.endpoint == Endpoint::Upstream).unwrap();
    assert_eq!((up.priority, up.time_to_live_secs), (3, Some(600)));
    let d = t.route(&msg(10.0));
    let up = d.iter().find(|d| d.endpoint == Endpoint::Upstream).unwrap();
    assert_eq!(
        (up.priority, up.time_to_live_secs),
        (DEFAULT_PRIORITY, Some(7200))
    );
    // Unrouted: nothing matches.
    let t = RouteTable::from_edge_hub_desired(&serde_json::json!({
        "schemaVersion": "1.0",
        "routes": {"r": "FROM /messages/modules/other/* INTO $upstream"},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
    }))
    .unwrap();
    assert!(t.route(&msg(1.0)).is_empty());
}

#[test]
fn deployment_errors_name_every_bad_route() {
    let desired = serde_json::json!({
        "schemaVersion": "1.1",
        "routes": {
            "ok": "FROM /messages/* INTO $upstream",
            "bad1": "FROM /messages/* WHERE a > 1 INTO $upstream",
            "bad2": {"route": "FROM /messages/* INTO $upstream", "priority": 12},
            "bad3": 5
        },
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
    });
    let errors = RouteTable::from_edge_hub_desired(&desired).unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 3, "{text:?}");
    assert!(text
        .iter()
        .any(|t| t.starts_with("route 'bad1': Invalid operands")));
    assert!(text
        .iter()
        .any(|t| t.contains("priority must be an integer from 0 to 9")));
    assert!(text.iter().any(|t| t.starts_with("route 'bad3'")));
    // Route objects need schema 1.1.
    let e = RouteTable::from_edge_hub_desired(&serde_json::json!({
        "schemaVersion": "1.0",
        "routes": {"r": {"route": "FROM /* INTO $upstream"}},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
    }))
    .unwrap_err();
    assert!(e[0].to_string().contains("schemaVersion 1.1"));
}

#[test]
fn twin_change_includes_only_for_twin_routes() {
    let r = Route::parse(
        "t",
        "FROM /twinChangeNotifications WHERE twin_change_includes(properties.reported.temp) INTO $upstream",
    )
    .unwrap();
    let m = Message::new(r#"{"properties": {"reported": {"temp": 1}}}"#)
        .with_system(SystemProperty::ContentType, "application/json")
        .with_system(SystemProperty::ContentEncoding, "utf-8")
        .with_source(MessageSource::TwinChangeNotification);
    assert!(r.matches(&m));
    let other = Message::new(r#"{"properties": {"reported": {"hum": 1}}}"#)
        .with_system(SystemProperty::ContentType, "application/json")
        .with_system(SystemProperty::ContentEncoding, "utf-8")
        .with_source(MessageSource::TwinChangeNotification);
    assert!(!r.matches(&other));
    assert!(Route::parse(
        "t",
        "FROM /messages WHERE twin_change_includes(a.b) INTO $upstream"
    )
    .is_err());
}

#[test]
fn table_swaps_atomically() {
    let shared = SharedRouteTable::new(RouteTable::new(vec![Route::parse(
        "a",
        "FROM /* INTO $upstream",
    )
    .unwrap()]));
    let before = shared.load();
    shared.replace(RouteTable::default());
    assert_eq!(before.routes().len(), 1, "a loaded table stays intact");
    assert!(shared.load().routes().is_empty());
}

#[test]
fn divergences_are_named_for_routes_check() {
    let desired = serde_json::json!({
        "schemaVersion": "1.1",
        "routes": {
            "events": "FROM /messages/events INTO $upstream",
            "date": "FROM /messages/* WHERE $body.time > '2024-01-31T00:00:00Z' INTO $upstream",
            "null": "FROM /messages/* WHERE is_null($body.x) INTO $upstream",
            "plain": "FROM /messages/* WHERE $body.x = 'abc' INTO $upstream"
        },
        "storeAndForwardConfiguration": {"timeToLiveSecs": 0}
    });
    let t = RouteTable::from_edge_hub_desired(&desired).unwrap();
    let d = t.divergences(&desired);
    assert_eq!(d.len(), 4, "{d:#?}");
    assert!(d[0].contains("timeToLiveSecs is 0"));
    for name in ["events", "date", "null"] {
        assert!(
            d.iter().any(|l| l.starts_with(&format!("route '{name}'"))),
            "{name}: {d:#?}"
        );
    }
    assert!(!d.iter().any(|l| l.contains("'plain'")));
    let quiet = serde_json::json!({
        "schemaVersion": "1.1",
        "routes": {"r": "FROM /messages/* INTO $upstream"},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
    });
    let t = RouteTable::from_edge_hub_desired(&quiet).unwrap();
    assert!(t.divergences(&quiet).is_empty());
}
