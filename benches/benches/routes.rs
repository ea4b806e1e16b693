//! Route engine: compile a 50-route deployment; evaluate simple, compound and
//! `$body` conditions; route one message through a 100-route table. The
//! reference is the same evaluation re-parsing the condition every time (what
//! an engine without a compile step pays).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use edgehub_router::{Condition, Message, MessageSource, RouteTable, SystemProperty};

fn body_1k() -> String {
    let mut fields: Vec<String> = (0..40)
        .map(|i| format!("\"field{i}\": \"value-{i:04}\""))
        .collect();
    fields.push("\"telemetry\": {\"temp\": 35.5, \"hum\": 40, \"tags\": [\"a\", \"b\"]}".into());
    let s = format!("{{{}}}", fields.join(", "));
    assert!(s.len() >= 1000, "{}", s.len());
    s
}

fn message() -> Message {
    Message::new(body_1k())
        .with_property("site", "north")
        .with_property("level", "critical")
        .with_property("temp", "35")
        .with_system(SystemProperty::ContentType, "application/json")
        .with_system(SystemProperty::ContentEncoding, "utf-8")
        .with_system(SystemProperty::ConnectionDeviceId, "dev-17")
        .with_source(MessageSource::ModuleOutput {
            module: "sensor".into(),
            output: "out1".into(),
        })
}

const SIMPLE: &str = "site = 'north'";
const COMPOUND: &str =
    "site = 'north' AND (level = 'critical' OR as_number(temp) > 30) AND $connectionDeviceId <> 'dev-1'";
const BODY: &str = "$body.telemetry.temp > 30 AND $body.telemetry.tags[1] = 'b'";

fn deployment(n: usize) -> serde_json::Value {
    let routes: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| {
            let r = match i % 4 {
                0 => format!("FROM /messages/modules/m{i}/outputs/* WHERE site = 'site-{i}' INTO $upstream"),
                1 => format!("FROM /messages/* WHERE $body.telemetry.temp > {i} INTO BrokeredEndpoint(\"/modules/m{i}/inputs/in\")"),
                2 => format!("FROM /messages/* WHERE level = 'critical' AND as_number(temp) > {i} INTO $upstream"),
                _ => format!("FROM /messages/modules/sensor/* WHERE starts_with($connectionDeviceId, 'dev-{i}') INTO BrokeredEndpoint(\"/modules/m{i}/inputs/in\")"),
            };
            (format!("route{i}"), serde_json::json!({"route": r, "priority": i % 10}))
        })
        .collect();
    serde_json::json!({"schemaVersion": "1.1", "routes": routes, "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}})
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    let d50 = deployment(50);
    g.throughput(Throughput::Elements(50));
    g.bench_function("deployment_50_routes", |b| {
        b.iter(|| {
            RouteTable::from_edge_hub_desired(&d50)
                .unwrap()
                .routes()
                .len()
        })
    });
    g.finish();

    let msg = message();
    let mut g = c.benchmark_group("evaluate");
    for (name, cond) in [("simple", SIMPLE), ("compound", COMPOUND)] {
        let compiled = Condition::compile(cond).unwrap();
        g.bench_function(format!("{name}/compiled"), |b| {
            b.iter(|| compiled.matches(&msg))
        });
        g.bench_function(format!("{name}/reparse-each-time"), |b| {
            b.iter(|| Condition::compile(cond).unwrap().matches(&msg))
        });
    }
    let body = Condition::compile(BODY).unwrap();
    // Body already parsed for this message (other routes looked at it).
    assert!(body.matches(&msg));
    g.bench_function("body_1k/compiled_json_cached", |b| {
        b.iter(|| body.matches(&msg))
    });
    // A new message every time: includes parsing the 1 KiB JSON body once.
    g.bench_function("body_1k/compiled_fresh_message", |b| {
        b.iter_batched(message, |m| body.matches(&m), BatchSize::SmallInput)
    });
    g.finish();

    let mut g = c.benchmark_group("table");
    let t100 = RouteTable::from_edge_hub_desired(&deployment(100)).unwrap();
    g.bench_function("route_100_routes_fresh_message", |b| {
        b.iter_batched(message, |m| t100.route(&m).len(), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
