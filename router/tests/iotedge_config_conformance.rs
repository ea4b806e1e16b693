//! Deployment-level vectors transcribed from IoT Edge's own test suites
//! (Azure/iotedge, MIT license): which manifests its config parser takes,
//! which route sources match which messages, which `$body` paths and
//! `twin_change_includes` arguments its validators accept, and how its
//! endpoint factory reads `BrokeredEndpoint` addresses. The source test of
//! each table is named above it. Where edgehub keeps a different,
//! documented behaviour, the vector says so.

use edgehub_router::{Endpoint, Message, MessageSource, Route, RouteTable, SystemProperty};
use serde_json::json;

fn manifest(schema: serde_json::Value) -> serde_json::Value {
    json!({
        "schemaVersion": schema,
        "routes": {"route1": "FROM /* INTO $upstream"},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 20},
        "$version": 2
    })
}

/// `Hub.Core.Test/Config/EdgeHubConfigParserTest.cs`, `SchemaVersionCheckTest`.
#[test]
fn schema_versions() {
    let accepted = ["1.0", "1.1", "1.1.0", "1.2", "1.2.0", "1.3"];
    let refused = ["0.1", "1", "2.0", "2.0.1", "1.4", "one.one", "1.1.", ""];
    for v in accepted {
        assert!(
            RouteTable::from_edge_hub_desired(&manifest(json!(v))).is_ok(),
            "{v} is accepted"
        );
    }
    for v in refused {
        let e = RouteTable::from_edge_hub_desired(&manifest(json!(v))).unwrap_err();
        assert!(e[0].to_string().contains("schemaVersion"), "{v}: {e:?}");
    }
    let mut no_version = manifest(json!("1.0"));
    no_version.as_object_mut().unwrap().remove("schemaVersion");
    let e = RouteTable::from_edge_hub_desired(&no_version).unwrap_err();
    assert!(e[0].to_string().contains("schemaVersion is missing"));
    // `versionMismatch`: a route object under schema 1.0.
    let e = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.0",
        "routes": {"route1": {"route": "FROM /* INTO $upstream", "priority": 1, "timeToLiveSecs": 7200}},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 20}
    }))
    .unwrap_err();
    assert!(e[0].to_string().contains("schemaVersion 1.1"));
}

/// `EdgeHubDesiredProperties_1_*` constructors and `RouteSpecConverter`:
/// storeAndForwardConfiguration is required, a 1.1 route name and route may
/// not be empty, schema 1.0 skips whitespace-only routes.
#[test]
fn manifest_shape() {
    let e = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.1", "routes": {"r": "FROM /* INTO $upstream"}
    }))
    .unwrap_err();
    assert!(e[0]
        .to_string()
        .contains("storeAndForwardConfiguration is missing"));
    let saf = json!({"timeToLiveSecs": 20});
    let e = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.1", "routes": {" ": "FROM /* INTO $upstream"},
        "storeAndForwardConfiguration": saf
    }))
    .unwrap_err();
    assert!(e[0].to_string().contains("empty route name"));
    let e = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.1", "routes": {"r": {"route": "  "}},
        "storeAndForwardConfiguration": saf
    }))
    .unwrap_err();
    assert!(e[0].to_string().contains("the route is empty"));
    let t = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.0",
        "routes": {"blank": "   ", "r": "FROM /* INTO $upstream"},
        "storeAndForwardConfiguration": saf
    }))
    .unwrap();
    assert_eq!(t.routes().len(), 1, "the whitespace-only route is skipped");
}

/// `RouteFactory.Create` and `RouteSpec`: a route without a time-to-live
/// (or with 0) takes the global one; priorities 0-9 only.
/// `StoreAndForwardConfiguration`: a negative global time-to-live is
/// "never expires".
#[test]
fn time_to_live() {
    let t = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.1",
        "routes": {
            "zero": {"route": "FROM /messages/modules/a/* INTO $upstream", "priority": 1, "timeToLiveSecs": 0},
            "set": {"route": "FROM /messages/modules/b/* INTO $upstream", "timeToLiveSecs": 30}
        },
        "storeAndForwardConfiguration": {"timeToLiveSecs": 20}
    }))
    .unwrap();
    let from = |m: &str| {
        Message::new("x").with_source(MessageSource::ModuleOutput {
            module: m.into(),
            output: "o".into(),
        })
    };
    assert_eq!(t.route(&from("a"))[0].time_to_live_secs, Some(20));
    assert_eq!(t.route(&from("b"))[0].time_to_live_secs, Some(30));
    let t = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.1", "routes": {"r": "FROM /* INTO $upstream"},
        "storeAndForwardConfiguration": {"timeToLiveSecs": -1}
    }))
    .unwrap();
    assert_eq!(t.default_ttl_secs, None, "negative: never expires");
    let e = RouteTable::from_edge_hub_desired(&json!({
        "schemaVersion": "1.1",
        "routes": {"r": {"route": "FROM /* INTO $upstream", "priority": 10}},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 20}
    }))
    .unwrap_err();
    assert!(e[0].to_string().contains("priority"));
}

/// `Routing.Core.Test/MessageSourceTest.cs`: route sources against the
/// telemetry, module-output and twin-change sources (module `ModId1`,
/// output `Op1`). The pattern tests there and ours agree on every vector.
#[test]
fn source_patterns() {
    let telemetry = Message::new("x").with_source(MessageSource::Telemetry);
    let twin = Message::new("x").with_source(MessageSource::TwinChangeNotification);
    let module = Message::new("x").with_source(MessageSource::ModuleOutput {
        module: "ModId1".into(),
        output: "Op1".into(),
    });
    let check = |msg: &Message, source: &str, expected: bool| {
        let r = Route::parse("r", &format!("FROM {source} INTO $upstream"))
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(
            r.matches(msg),
            expected,
            "{source} against {:?}",
            msg.source
        );
    };
    for s in ["/*", "/messages", "/messages/*", "/messages/events"] {
        check(&telemetry, s, true);
    }
    for s in [
        "/twinChangeNotifications",
        "/foo/*",
        "/message",
        "/*/messages/*",
        "/messages/event",
        "/messages/modules",
        "/messages/modules/*",
        "/messages/modules/ModId1",
        "/messages/modules/ModId1/*",
    ] {
        check(&telemetry, s, false);
    }
    for s in [
        "/*",
        "/twinChangeNotifications",
        "/twinChangeNotifications/*",
    ] {
        check(&twin, s, true);
    }
    for s in [
        "/messages",
        "/foo/*",
        "/message",
        "/*/messages/*",
        "/messages/modules",
        "/messages/modules/*",
        "/messages/modules/ModId1",
        "/messages/modules/ModId1/*",
    ] {
        check(&twin, s, false);
    }
    for s in [
        "/*",
        "/messages",
        "/messages/*",
        "/messages/modules",
        "/messages/modules/*",
        "/messages/modules/ModId1",
        "/messages/modules/ModId1/*",
        "/messages/modules/ModId1/outputs",
        "/messages/modules/ModId1/outputs/*",
        "/messages/modules/ModId1/outputs/Op1",
    ] {
        check(&module, s, true);
    }
    for s in [
        "/foo",
        "/*/bar/*",
        "/modulemessages",
        "/messages/events",
        "/messages/modules/events",
        "/messages/modules/ModId2",
        "/messages/modules/ModId2/*",
        "/messages/modules/ModId1/outputs/Op2",
    ] {
        check(&module, s, false);
    }
    // The grammar's `path: '/' item path | '/' item`: a bare or trailing '/'
    // does not parse.
    for s in ["/", "/messages/"] {
        assert!(
            Route::parse("r", &format!("FROM {s} INTO $upstream")).is_err(),
            "{s}"
        );
    }
}

/// `Hub.Core` `EndpointFactory.CreateFunctionEndpoint`: the address is
/// trimmed, one leading and one trailing '/' dropped, four parts read by
/// position.
#[test]
fn brokered_endpoint_addresses() {
    let sink = |addr: &str| {
        Route::parse("r", &format!("FROM /* INTO BrokeredEndpoint(\"{addr}\")")).map(|r| r.endpoint)
    };
    let expect = |m: &str, i: &str| Endpoint::ModuleInput {
        module: m.into(),
        input: i.into(),
    };
    for addr in [
        "/modules/m/inputs/i",
        "modules/m/inputs/i",
        "/modules/m/inputs/i/",
        "  /modules/m/inputs/i  ",
        "/foo/m/bar/i",
    ] {
        assert_eq!(sink(addr).unwrap(), expect("m", "i"), "{addr:?}");
    }
    for addr in ["/modules/m", "/modules/m/inputs/i/x", "", "/"] {
        assert!(sink(addr).is_err(), "{addr:?}");
    }
    let r = Route::parse(
        "r",
        "FROM /* INTO brokeredendpoint ( '/modules/m/inputs/i' )",
    )
    .unwrap();
    assert_eq!(r.endpoint, expect("m", "i"));
}

fn json_message(body: &str, source: MessageSource) -> Message {
    Message::new(body.to_owned())
        .with_system(SystemProperty::ContentType, "application/json")
        .with_system(SystemProperty::ContentEncoding, "UTF-8")
        .with_source(source)
}

/// `Routing.Core.Test/jsonpath/JsonPathValidatorTest.cs`, applied to
/// `$body` queries (`BodyQuery.Create` validates the path the same way).
#[test]
fn body_query_paths() {
    let compiles = |path: &str| {
        Route::parse(
            "r",
            &format!("FROM /* WHERE $body.{path} = 1 INTO $upstream"),
        )
        .is_ok()
    };
    for path in [
        "root",
        "ROOT",
        "root.level1",
        "ROOT.LEVEL1",
        "root.level1.level2.level3.level4",
        "root.level1[0]",
        "root.level1[0].level2[1].level3[3].level4[5]",
        "root[10000]",
        "123abc",
    ] {
        assert!(compiles(path), "{path} is a valid $body path");
    }
    for path in [
        "root.",
        "ROOT[",
        "root.level1.",
        "root.level1..level2",
        "ROOT.LEVEL1.",
        "root.level1[",
        "root.level1[]",
        "root.level1['test']",
        "root.level1[].level2[1].level3[3].level4[5]",
        "root[10000].level1.[1]",
        "root[10000].level1[1].level2[]",
        "a[0][1]",
    ] {
        assert!(!compiles(path), "{path} is refused");
    }
}

const TWIN: &str = r#"{"properties":{"reported":{"WeatherTwin":{"Temperature":50,"Location":{"Street":"One Microsoft Way","City":"Redmond","State":"WA"}},"Metadata":"metadata","Gone":null,"$version":4}}}"#;

/// `Routing.Core.Test/query/TwinChangeIncludesTest.cs`.
#[test]
fn twin_change_includes() {
    let twin = json_message(TWIN, MessageSource::TwinChangeNotification);
    let eval = |cond: &str| {
        let r = Route::parse(
            "r",
            &format!("FROM /twinChangeNotifications WHERE {cond} INTO $upstream"),
        )
        .unwrap_or_else(|e| panic!("{cond}: {e}"));
        r.condition.unwrap().evaluate(&twin)
    };
    for cond in [
        "twin_change_includes(properties.reported.WeatherTwin)",
        "TWIN_CHANGE_INCLUDES(properties.reported.WeatherTwin)",
        "Twin_Change_Includes(properties.reported.WeatherTwin)",
        "twin_change_includes(properties.reported.WeatherTwin.Temperature)",
        "twin_change_includes(properties.reported.WeatherTwin.Location.Street)",
        "twin_change_includes(properties.reported.WeatherTwin.Location.City) AND twin_change_includes(properties.reported.WeatherTwin.Temperature)",
        "twin_change_includes(properties.reported.WeatherTwin.Location.City) AND twin_change_includes(properties.reported.WeatherTwin.Temperature) = true",
        "twin_change_includes(properties.reported.WeatherTwin.Location.City) AND Not(twin_change_includes(properties.reported.WeatherTwin.Temperature123))",
    ] {
        assert_eq!(eval(cond), Some(true), "{cond}");
    }
    for cond in [
        "twin_change_includes(properties.desired.WeatherTwin)",
        "twin_change_includes(properties.reported.WeatherTwin.Location.City) AND twin_change_includes(properties.reported.WeatherTwin.Temperature123)",
        // A null value is no change.
        "twin_change_includes(properties.reported.Gone)",
    ] {
        assert_eq!(eval(cond), Some(false), "{cond}");
    }
    for cond in [
        "twin_change_includes()",
        "twin_change_includes(      )",
        "twin_change_includes(properties.)",
        "twin_change_includes(123123)",
        "twin_change_includes(properties.abcd123)",
        "twin_change_includes(123abc)",
        "twin_change_includes(properties.desired.twin,,,,,)",
        "twin_change_includes(properties[0])",
        "twin_change_includes(properties.desired.twin[0].test1)",
        "twin_change_includes(properties.desired.[123])",
        "twin_change_includes(properties.desired.WeatherTwin[])",
        "twin_change_includes(properties[])",
        "twin_change_includes(properties[123].)",
        "twin_change_includes(properties[123].props11.)",
        "twin_change_includes(properties[123].props11, abc)",
    ] {
        assert!(
            Route::parse(
                "r",
                &format!("FROM /twinChangeNotifications WHERE {cond} INTO $upstream")
            )
            .is_err(),
            "{cond} does not compile"
        );
    }
    // Only for twin-change routes (`TestTwinChangeIncludes_NotSupported_MessageSource`).
    assert!(Route::parse(
        "r",
        "FROM /messages WHERE twin_change_includes(properties.reported.WeatherTwin) INTO $upstream"
    )
    .is_err());
    // A body that is not JSON, or not in the encoding it claims: undefined.
    let r = Route::parse(
        "r",
        "FROM /twinChangeNotifications WHERE twin_change_includes(properties.reported.WeatherTwin) INTO $upstream",
    )
    .unwrap();
    let c = r.condition.unwrap();
    for body in ["", "random message"] {
        let m = json_message(body, MessageSource::TwinChangeNotification);
        assert_eq!(c.evaluate(&m), None, "{body:?}");
    }
    let utf16: Vec<u8> = TWIN.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let m = Message::new(utf16)
        .with_system(SystemProperty::ContentType, "application/json")
        .with_system(SystemProperty::ContentEncoding, "UTF-8")
        .with_source(MessageSource::TwinChangeNotification);
    assert_eq!(c.evaluate(&m), None);
}

/// `Routing.Core/Constants.cs`: the content encodings `$body` understands
/// are exactly utf-8, utf-16 and utf-32 (any case); others leave it
/// undefined.
#[test]
fn content_encodings() {
    let r = Route::parse("r", "FROM /* WHERE $body.a = 1 INTO $upstream").unwrap();
    let c = r.condition.unwrap();
    let with = |enc: &str, body: Vec<u8>| {
        Message::new(body)
            .with_system(SystemProperty::ContentType, "application/json")
            .with_system(SystemProperty::ContentEncoding, enc)
    };
    let text = r#"{"a": 1}"#;
    assert_eq!(c.evaluate(&with("utf-8", text.into())), Some(true));
    assert_eq!(c.evaluate(&with("UTF-8", text.into())), Some(true));
    let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert_eq!(c.evaluate(&with("utf-16", utf16)), Some(true));
    let utf32: Vec<u8> = text
        .chars()
        .flat_map(|ch| (ch as u32).to_le_bytes())
        .collect();
    assert_eq!(c.evaluate(&with("utf-32", utf32)), Some(true));
    for enc in ["utf8", "utf16le", "latin1", "ascii"] {
        assert_eq!(c.evaluate(&with(enc, text.into())), None, "{enc}");
    }
}
