//! `edgehub routes test` and `edgehub routes check`: the route engine for
//! people, without a running hub.

use std::path::Path;

use anyhow::{bail, Context};
use base64::Engine;
use edgehub_router::{Condition, Message, MessageSource, Route, RouteTable};

/// Builds a message from the documented JSON format.
pub fn message_from_json(v: &serde_json::Value) -> anyhow::Result<Message> {
    let obj = v
        .as_object()
        .context("the message file must hold a JSON object")?;
    let body: Vec<u8> = match (obj.get("body"), obj.get("bodyBase64")) {
        (Some(_), Some(_)) => bail!("give either \"body\" or \"bodyBase64\", not both"),
        (Some(b), None) => b
            .as_str()
            .context("\"body\" must be a string")?
            .as_bytes()
            .to_vec(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.as_str().context("\"bodyBase64\" must be a string")?)
            .context("\"bodyBase64\" is not valid base64")?,
        (None, None) => Vec::new(),
    };
    let mut msg = Message::new(body);
    if let Some(props) = obj.get("properties") {
        for (k, v) in props
            .as_object()
            .context("\"properties\" must be an object")?
        {
            let v = v.as_str().with_context(|| {
                format!("application property {k:?} must be a string (they always are)")
            })?;
            msg.set_property(k, v);
        }
    }
    if let Some(props) = obj.get("systemProperties") {
        for (k, v) in props
            .as_object()
            .context("\"systemProperties\" must be an object")?
        {
            // Any name is allowed, as in IoT Edge; well-known ones become fields.
            let v = v
                .as_str()
                .with_context(|| format!("system property {k:?} must be a string"))?;
            msg.set_system_named(k, v);
        }
    }
    let source = match obj
        .get("source")
        .map(|s| s.as_str().context("\"source\" must be a string"))
    {
        None => MessageSource::Telemetry,
        Some(s) => {
            let s = s?;
            let parts: Vec<&str> = s.split('/').collect();
            match parts.as_slice() {
                _ if s.eq_ignore_ascii_case("telemetry") => MessageSource::Telemetry,
                _ if s.eq_ignore_ascii_case("twinChangeNotifications")
                    || s.eq_ignore_ascii_case("/twinChangeNotifications") =>
                {
                    MessageSource::TwinChangeNotification
                }
                ["", "messages", "modules", m, "outputs", o] => MessageSource::ModuleOutput {
                    module: (*m).into(),
                    output: (*o).into(),
                },
                // A module message sent without an output name.
                ["", "messages", "modules", m] => MessageSource::ModuleOutput {
                    module: (*m).into(),
                    output: "".into(),
                },
                _ => bail!(
                    "\"source\" must be \"telemetry\", \"twinChangeNotifications\", \"/messages/modules/<module>\" or \"/messages/modules/<module>/outputs/<output>\", got {s:?}"
                ),
            }
        }
    };
    Ok(msg.with_source(source))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Prints the verdict; an invalid route is an error (exit code 1).
pub fn test(route: &str, message: &Path) -> anyhow::Result<()> {
    let msg = message_from_json(&read_json(message)?)?;
    let r = Route::parse("route", route).map_err(|e| anyhow::anyhow!("{e}"))?;
    let source_ok = r.source.matches(msg.source.as_ref());
    let condition = match &r.condition {
        None => "none (always true)".to_owned(),
        Some(c) => describe(c, &msg),
    };
    println!(
        "source:    {} ({})",
        r.source.as_str(),
        if source_ok {
            "matches"
        } else {
            "does not match"
        }
    );
    println!("condition: {condition}");
    println!("endpoint:  {}", r.endpoint);
    println!("matches:   {}", if r.matches(&msg) { "yes" } else { "no" });
    Ok(())
}

fn describe(c: &Condition, msg: &Message) -> String {
    match c.evaluate(msg) {
        Some(true) => "true".into(),
        Some(false) => "false".into(),
        None => format!("undefined (value: {:?})", c.value(msg)),
    }
}

/// The `$edgeHub` desired properties inside a deployment manifest (or the
/// document itself when it is just those).
pub fn edge_hub_desired(v: &serde_json::Value) -> &serde_json::Value {
    v.pointer("/modulesContent/$edgeHub/properties.desired")
        .or_else(|| v.pointer("/content/modulesContent/$edgeHub/properties.desired"))
        .unwrap_or(v)
}

/// Checks every route; returns the number of errors after printing them.
/// Each valid route is printed with the priority and time-to-live it
/// gets; deliberate differences from IoT Edge are printed as warnings.
pub fn check(deployment: &Path) -> anyhow::Result<usize> {
    let v = read_json(deployment)?;
    let desired = edge_hub_desired(&v);
    match RouteTable::from_edge_hub_desired(desired) {
        Ok(t) => {
            let global = match t.default_ttl_secs {
                None | Some(0) => "never expires".to_owned(),
                Some(s) => format!("{s} s"),
            };
            for r in t.routes() {
                let priority = match r.priority {
                    edgehub_router::DEFAULT_PRIORITY => "default (below 0-9)".to_owned(),
                    p => p.to_string(),
                };
                let ttl = match r.time_to_live_secs {
                    Some(s) => format!("{s} s"),
                    None => format!("{global} (global)"),
                };
                println!("ok    {}: {}", r.name, r.text);
                println!("      priority {priority}, time-to-live {ttl}");
            }
            for w in t.divergences(desired) {
                println!("warn  {w}");
            }
            println!("{} routes, all valid", t.routes().len());
            Ok(0)
        }
        Err(errors) => {
            for e in &errors {
                println!("error {e}");
            }
            Ok(errors.len())
        }
    }
}
