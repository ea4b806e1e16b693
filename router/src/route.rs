//! Routes (`[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`), the
//! route table built from a deployment, and fan-out with per-endpoint dedup.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::condition::{CompileErrors, Condition};
use crate::message::{Message, MessageSource};
use crate::syntax::{lex, pos_at, SyntaxError, Tok};

/// `storeAndForwardConfiguration.timeToLiveSecs` IoT Edge documents as its
/// default (two hours).
pub const DEFAULT_TTL_SECS: u32 = 7200;

/// Priority of schema 1.0 string routes: below every explicit 0-9.
pub const DEFAULT_PRIORITY: u32 = u32::MAX;

/// Where a route sends messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// IoT Hub or the parent hub.
    Upstream,
    /// `BrokeredEndpoint("/modules/<module>/inputs/<input>")`.
    ModuleInput { module: Arc<str>, input: Arc<str> },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Upstream => f.write_str("$upstream"),
            Endpoint::ModuleInput { module, input } => {
                write!(f, "BrokeredEndpoint(\"/modules/{module}/inputs/{input}\")")
            }
        }
    }
}

/// A route source: any path the grammar takes (`/` followed by `/`-separated
/// items, each `*` or an identifier), matched as IoT Edge matches it. The
/// text is normalized once (trailing `*` trimmed, then a trailing `/`, then
/// one `/` appended) and a message matches when that is a case-insensitive
/// prefix of its own source path: `/messages/events/` for device telemetry,
/// `/messages/modules/<m>/outputs/<o>/` for a module output,
/// `/messages/modules/<m>/` for a module message without an output name,
/// `/twinChangeNotifications/` for twin change notifications. So
/// `/messages/modules/m1*` takes module `m1` and not `m10`, and a path that
/// names nothing the hub sends (`/foo`) is valid and matches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    text: String,
    /// The normalized prefix, lower-cased, ending in `/`.
    prefix: String,
}

impl Source {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The normalized prefix messages are matched against.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn is_twin(&self) -> bool {
        self.prefix == "/twinchangenotifications/"
    }

    /// Whether IoT Edge 1.1 and later take device telemetry with this
    /// source while edgehub does (`/messages/events`: IoT Edge 1.0's
    /// telemetry path, which later versions shortened to `/messages`).
    pub fn names_events_path(&self) -> bool {
        self.prefix.starts_with("/messages/events/")
    }

    pub fn parse(text: &str) -> Option<Source> {
        let rest = text.strip_prefix('/')?;
        if rest
            .split('/')
            .any(|item| item.is_empty() || !item.chars().all(crate::syntax::is_id_char))
        {
            return None;
        }
        let mut p = text.trim_end_matches('*');
        if p.len() > 1 {
            p = p.trim_end_matches('/');
        }
        let prefix = format!("{}/", p.trim_end_matches('/')).to_lowercase();
        Some(Source {
            text: text.to_owned(),
            prefix,
        })
    }

    /// Whether a message from `source` is taken by this route source.
    pub fn matches(&self, source: Option<&MessageSource>) -> bool {
        let m: [&str; 5];
        let path: &[&str] = match source {
            None | Some(MessageSource::Telemetry) => &["messages", "events"],
            Some(MessageSource::ModuleOutput { module, output }) if output.is_empty() => {
                m = ["messages", "modules", module, "", ""];
                &m[..3]
            }
            Some(MessageSource::ModuleOutput { module, output }) => {
                m = ["messages", "modules", module, "outputs", output];
                &m
            }
            Some(MessageSource::TwinChangeNotification) => &["twinChangeNotifications"],
        };
        is_prefix_of_path(self.prefix.as_bytes(), path)
    }
}

/// Whether `prefix` starts `/p0/p1/…/pn/` (ASCII case-insensitively),
/// without building that string: this runs per route per message.
fn is_prefix_of_path(prefix: &[u8], parts: &[&str]) -> bool {
    let mut rest = prefix;
    // Consumes `s` from `rest`; `Some(true)`: the prefix ended inside it.
    let mut take = |s: &[u8]| -> Option<bool> {
        let n = rest.len().min(s.len());
        if !rest[..n].eq_ignore_ascii_case(&s[..n]) {
            return None;
        }
        rest = &rest[n..];
        Some(rest.is_empty())
    };
    for part in parts {
        match take(b"/") {
            None => return false,
            Some(true) => return true,
            Some(false) => {}
        }
        match take(part.as_bytes()) {
            None => return false,
            Some(true) => return true,
            Some(false) => {}
        }
    }
    take(b"/") == Some(true)
}

/// A compiled route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub text: String,
    pub source: Source,
    pub condition: Option<Condition>,
    pub endpoint: Endpoint,
    /// 0 is the highest; [`DEFAULT_PRIORITY`] for schema 1.0 routes.
    pub priority: u32,
    /// Seconds a message routed here may wait; `None`: the hub's global TTL.
    pub time_to_live_secs: Option<u32>,
}

/// Why a route or deployment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route '{route}': {error}")]
    Syntax { route: String, error: SyntaxError },
    #[error("route '{route}': {errors}")]
    Condition {
        route: String,
        errors: CompileErrors,
    },
    #[error("route '{route}': {message}")]
    Invalid { route: String, message: String },
    #[error("deployment: {0}")]
    Deployment(String),
}

fn err(name: &str, text: &str, offset: usize, message: impl Into<String>) -> RouteError {
    RouteError::Syntax {
        route: name.to_owned(),
        error: SyntaxError {
            message: message.into(),
            pos: pos_at(text, offset),
        },
    }
}

fn skip_ws(text: &str, i: usize) -> usize {
    i + text[i..].len() - text[i..].trim_start().len()
}

fn keyword_at(text: &str, i: usize, kw: &str) -> bool {
    let rest = &text[i..];
    rest.len() >= kw.len()
        && rest.as_bytes()[..kw.len()].eq_ignore_ascii_case(kw.as_bytes())
        && rest[kw.len()..]
            .chars()
            .next()
            .is_none_or(|c| c.is_whitespace() || c == '*' || c == '(')
}

impl Route {
    /// Parses and compiles `text`; errors carry 1-based positions in `text`.
    pub fn parse(name: &str, text: &str) -> Result<Route, RouteError> {
        let mut i = skip_ws(text, 0);
        if keyword_at(text, i, "select") {
            i = skip_ws(text, i + 6);
            if !text[i..].starts_with('*') {
                return Err(err(
                    name,
                    text,
                    i,
                    "Syntax error: expected '*' after SELECT",
                ));
            }
            i = skip_ws(text, i + 1);
        }
        if !keyword_at(text, i, "from") {
            return Err(err(name, text, i, "Syntax error: expected FROM"));
        }
        i = skip_ws(text, i + 4);
        let src_len = text[i..]
            .find(char::is_whitespace)
            .unwrap_or(text.len() - i);
        let src_text = &text[i..i + src_len];
        let source = Source::parse(src_text).ok_or_else(|| {
            err(
                name,
                text,
                i,
                format!(
                    "invalid source '{src_text}': expected a path such as /messages/*, /messages/modules/<module>/outputs/* or /twinChangeNotifications (a '/' followed by non-empty items, no trailing '/')"
                ),
            )
        })?;
        i = skip_ws(text, i + src_len);
        // INTO is found with the condition lexer, so an "INTO" inside a
        // string literal or comment is not mistaken for the keyword.
        let rest = &text[i..];
        let into = lex(rest)
            .into_iter()
            .find(|t| t.tok == Tok::Into)
            .map(|t| i + t.start);
        let Some(into) = into else {
            return Err(err(
                name,
                text,
                text.trim_end().len(),
                "Syntax error: expected INTO",
            ));
        };
        let condition = if keyword_at(text, i, "where") {
            let start = skip_ws(text, i + 5);
            let cond_text = &text[start..into];
            if cond_text.trim().is_empty() {
                return Err(err(
                    name,
                    text,
                    start,
                    "Syntax error: expected a condition after WHERE",
                ));
            }
            Some(
                Condition::compile_in(text, start, cond_text, source.is_twin()).map_err(
                    |errors| RouteError::Condition {
                        route: name.to_owned(),
                        errors,
                    },
                )?,
            )
        } else if into != i {
            return Err(err(name, text, i, "Syntax error: expected WHERE or INTO"));
        } else {
            None
        };
        let sink_at = skip_ws(text, into + 4);
        let endpoint =
            parse_sink(text[sink_at..].trim_end()).map_err(|m| err(name, text, sink_at, m))?;
        Ok(Route {
            name: name.to_owned(),
            text: text.to_owned(),
            source,
            condition,
            endpoint,
            priority: DEFAULT_PRIORITY,
            time_to_live_secs: None,
        })
    }

    /// Whether this route takes `msg` (source matches and condition is true).
    pub fn matches(&self, msg: &Message) -> bool {
        self.source.matches(msg.source.as_ref())
            && self.condition.as_ref().is_none_or(|c| c.matches(msg))
    }
}

/// The sink after INTO: `$upstream`, or `BrokeredEndpoint("<address>")` read
/// as IoT Edge's endpoint factory reads it: the address trimmed, one
/// leading and one trailing `/` dropped, four `/`-separated parts, the
/// module second and the input fourth (`/modules/<m>/inputs/<i>`).
fn parse_sink(s: &str) -> Result<Endpoint, String> {
    let expected = "expected $upstream or BrokeredEndpoint(\"/modules/<module>/inputs/<input>\")";
    if s.starts_with('$') {
        return if s.eq_ignore_ascii_case("$upstream") {
            Ok(Endpoint::Upstream)
        } else {
            Err(format!(
                "system endpoint '{s}' is not supported: {expected}"
            ))
        };
    }
    let func_len = s
        .char_indices()
        .find(|(_, c)| !crate::syntax::is_id_char(*c))
        .map_or(s.len(), |(i, _)| i);
    let (func, rest) = s.split_at(func_len);
    if func.is_empty() || !rest.trim_start().starts_with('(') {
        return Err(format!("invalid sink '{s}': {expected}"));
    }
    if !func.eq_ignore_ascii_case("brokeredendpoint") {
        return Err(format!(
            "function endpoint '{func}' is not supported: {expected}"
        ));
    }
    let inner = rest
        .trim_start()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("invalid sink: {expected}"))?
        .trim();
    let address = inner
        .strip_prefix('"')
        .and_then(|p| p.strip_suffix('"'))
        .or_else(|| inner.strip_prefix('\'').and_then(|p| p.strip_suffix('\'')))
        .ok_or_else(|| format!("invalid sink: the address must be a quoted string: {expected}"))?;
    let mut path = address.trim();
    path = path.strip_prefix('/').unwrap_or(path);
    path = path.strip_suffix('/').unwrap_or(path);
    let parts: Vec<&str> = path.split('/').collect();
    let [_, module, _, input] = parts.as_slice() else {
        return Err(format!(
            "BrokeredEndpoint address '{address}' could not be parsed: expected /modules/<module>/inputs/<input>"
        ));
    };
    if module.is_empty() || input.is_empty() {
        return Err(format!(
            "BrokeredEndpoint address '{address}' names no module or no input"
        ));
    }
    Ok(Endpoint::ModuleInput {
        module: (*module).into(),
        input: (*input).into(),
    })
}

/// Where one message goes: each endpoint once, with the winning route's
/// priority and time-to-live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub endpoint: Endpoint,
    pub priority: u32,
    pub time_to_live_secs: Option<u32>,
    /// Name of the route that won for this endpoint.
    pub route: String,
}

/// The compiled routes of a deployment.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// `storeAndForwardConfiguration.timeToLiveSecs`.
    pub default_ttl_secs: Option<u32>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> RouteTable {
        RouteTable {
            routes,
            default_ttl_secs: None,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Every endpoint `msg` goes to. Routes are grouped by endpoint; per
    /// endpoint the lowest priority number wins (the first such route on a
    /// tie) and its time-to-live applies. Empty: the message is unrouted.
    pub fn route(&self, msg: &Message) -> Vec<Decision> {
        let mut out: Vec<Decision> = Vec::new();
        for r in &self.routes {
            if !r.matches(msg) {
                continue;
            }
            let ttl = r.time_to_live_secs.or(self.default_ttl_secs);
            match out.iter_mut().find(|d| d.endpoint == r.endpoint) {
                Some(d) if r.priority < d.priority => {
                    d.priority = r.priority;
                    d.time_to_live_secs = ttl;
                    d.route = r.name.clone();
                }
                Some(_) => {}
                None => out.push(Decision {
                    endpoint: r.endpoint.clone(),
                    priority: r.priority,
                    time_to_live_secs: ttl,
                    route: r.name.clone(),
                }),
            }
        }
        out
    }

    /// Builds the table from `$edgeHub` desired properties as IoT Edge's
    /// config parser reads them. `schemaVersion` is required and read as a
    /// version (`1.0` … `1.3`, a patch or revision number allowed: `1.1.0`);
    /// `storeAndForwardConfiguration` is required. Schema 1.0 maps names to
    /// route strings (whitespace-only ones are skipped); 1.1 and later also
    /// to `{route, priority 0-9, timeToLiveSecs}` and refuse an empty route
    /// name or route. A route `timeToLiveSecs` of 0 means the global one; a
    /// negative global one means messages never expire. Every route is
    /// checked; all errors are returned.
    pub fn from_edge_hub_desired(
        desired: &serde_json::Value,
    ) -> Result<RouteTable, Vec<RouteError>> {
        let dep = |m: String| vec![RouteError::Deployment(m)];
        let minor = match desired.get("schemaVersion") {
            None | Some(serde_json::Value::Null) => {
                return Err(dep(
                    "schemaVersion is missing (IoT Edge requires it in $edgeHub's desired properties, e.g. \"1.1\")".into(),
                ))
            }
            Some(v) => {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                schema_minor(&text).map_err(dep)?
            }
        };
        let v11 = minor >= 1;
        let routes = match desired.get("routes") {
            Some(serde_json::Value::Object(o)) => Some(o),
            None | Some(serde_json::Value::Null) if !v11 => None,
            _ => return Err(dep("'routes' must be an object of name → route".into())),
        };
        let default_ttl_secs = match desired.get("storeAndForwardConfiguration") {
            Some(serde_json::Value::Object(saf)) => match saf.get("timeToLiveSecs") {
                // Absent, IoT Edge reads 0 and drops messages at once;
                // its documented default is kept instead (`routes check`
                // warns).
                None => Some(DEFAULT_TTL_SECS),
                Some(v) => match v.as_i64().and_then(|v| i32::try_from(v).ok()) {
                    Some(t) if t < 0 => None,
                    Some(t) => Some(t as u32),
                    None => {
                        return Err(dep(format!(
                            "storeAndForwardConfiguration.timeToLiveSecs must be a 32-bit integer, got {v}"
                        )))
                    }
                },
            },
            None | Some(serde_json::Value::Null) => {
                return Err(dep(
                    "storeAndForwardConfiguration is missing (IoT Edge requires it, e.g. {\"timeToLiveSecs\": 7200})".into(),
                ))
            }
            Some(_) => {
                return Err(dep(
                    "storeAndForwardConfiguration must be an object such as {\"timeToLiveSecs\": 7200}".into(),
                ))
            }
        };
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for (name, spec) in routes.into_iter().flatten() {
            let invalid = |message: String| RouteError::Invalid {
                route: name.clone(),
                message,
            };
            if v11 && name.trim().is_empty() {
                errors.push(invalid("empty route name".into()));
                continue;
            }
            let (text, priority, ttl) = match spec {
                serde_json::Value::String(s) if !v11 && s.trim().is_empty() => continue,
                serde_json::Value::String(s) => (s.as_str(), DEFAULT_PRIORITY, None),
                serde_json::Value::Object(o) if v11 => {
                    let Some(text) = o.get("route").and_then(|r| r.as_str()) else {
                        errors.push(invalid("'route' must be a string".into()));
                        continue;
                    };
                    let priority = match o.get("priority") {
                        None | Some(serde_json::Value::Null) => DEFAULT_PRIORITY,
                        Some(p) => match p.as_u64() {
                            Some(p) if p <= 9 => p as u32,
                            _ => {
                                errors.push(invalid(format!(
                                    "priority must be an integer from 0 to 9, got {p}"
                                )));
                                continue;
                            }
                        },
                    };
                    let ttl = match o.get("timeToLiveSecs") {
                        None | Some(serde_json::Value::Null) => None,
                        Some(t) => match t.as_u64().and_then(|t| u32::try_from(t).ok()) {
                            // 0: not set, the global time-to-live applies.
                            Some(0) => None,
                            Some(t) => Some(t),
                            None => {
                                errors.push(invalid(format!(
                                    "timeToLiveSecs must be a non-negative integer, got {t}"
                                )));
                                continue;
                            }
                        },
                    };
                    (text, priority, ttl)
                }
                serde_json::Value::Object(_) => {
                    errors.push(invalid("route objects need schemaVersion 1.1".into()));
                    continue;
                }
                _ => {
                    errors.push(invalid("a route must be a string or an object".into()));
                    continue;
                }
            };
            if text.trim().is_empty() {
                errors.push(invalid("the route is empty".into()));
                continue;
            }
            match Route::parse(name, text) {
                Ok(mut r) => {
                    r.priority = priority;
                    r.time_to_live_secs = ttl;
                    out.push(r);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(RouteTable {
                routes: out,
                default_ttl_secs,
            })
        } else {
            Err(errors)
        }
    }
}

impl RouteTable {
    /// Where edgehub reads this deployment differently from IoT Edge, on
    /// purpose (the router's README says why), one line each, for
    /// `edgehub routes check` to warn about. `desired` is what the table was
    /// built from.
    pub fn divergences(&self, desired: &serde_json::Value) -> Vec<String> {
        let mut out = Vec::new();
        match desired.pointer("/storeAndForwardConfiguration/timeToLiveSecs") {
            None => out.push(format!(
                "storeAndForwardConfiguration has no timeToLiveSecs: IoT Edge reads 0; edgehub keeps messages for the documented default of {DEFAULT_TTL_SECS} s"
            )),
            Some(v) if v.as_i64() == Some(0) => out.push(
                "storeAndForwardConfiguration.timeToLiveSecs is 0: edgehub keeps messages until they are delivered (no expiry); IoT Edge reads it as a zero time-to-live".into(),
            ),
            Some(_) => {}
        }
        for r in &self.routes {
            if r.source.names_events_path() {
                out.push(format!(
                    "route '{}': FROM {} takes device telemetry here, as IoT Edge 1.0 did; IoT Edge 1.1 and later match nothing with it (for device telemetry only, write FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId))",
                    r.name,
                    r.source.as_str()
                ));
            }
            let lower = r.text.to_ascii_lowercase();
            if lower.contains("$body") && has_iso_date_literal(&r.text) {
                out.push(format!(
                    "route '{}': compares with an ISO-8601 date string; edgehub keeps date-like JSON strings as strings, IoT Edge turns them into dates, so there such comparisons are undefined",
                    r.name
                ));
            }
            if lower.contains("is_null(") && lower.contains("$body") {
                out.push(format!(
                    "route '{}': is_null on a $body value is true here for a JSON null; IoT Edge compares by reference, so it may answer differently",
                    r.name
                ));
            }
        }
        out
    }
}

/// Whether `text` holds a quoted literal that starts like an ISO-8601 date
/// and time (`'2024-01-31T…`).
fn has_iso_date_literal(text: &str) -> bool {
    let b = text.as_bytes();
    (0..b.len()).any(|i| {
        matches!(b[i], b'\'' | b'"')
            && b.len() >= i + 12
            && b[i + 1..i + 5].iter().all(u8::is_ascii_digit)
            && b[i + 5] == b'-'
            && b[i + 6..i + 8].iter().all(u8::is_ascii_digit)
            && b[i + 8] == b'-'
            && b[i + 9..i + 11].iter().all(u8::is_ascii_digit)
            && b[i + 11] == b'T'
    })
}

/// The minor version of an `$edgeHub` schemaVersion, read as .NET reads a
/// version (two to four dot-separated non-negative integers); IoT Edge
/// knows 1.0 to 1.3.
fn schema_minor(text: &str) -> Result<u32, String> {
    let bad = || {
        format!(
            "schemaVersion '{text}' is not a version (expected major.minor[.build[.revision]], e.g. \"1.1\")"
        )
    };
    let parts: Vec<&str> = text.split('.').collect();
    if !(2..=4).contains(&parts.len()) {
        return Err(bad());
    }
    let nums: Vec<u32> = parts
        .iter()
        .map(|p| {
            let p = p.trim();
            let p = p.strip_prefix('+').unwrap_or(p);
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse::<u32>().map_err(|_| bad())
        })
        .collect::<Result<_, _>>()?;
    match (nums[0], nums[1]) {
        (1, minor @ 0..=3) => Ok(minor),
        _ => Err(format!(
            "unsupported schemaVersion '{text}' (IoT Edge's $edgeHub schemas are 1.0 to 1.3)"
        )),
    }
}

/// The table in force, swapped atomically when the deployment changes:
/// messages being routed keep the table they started with.
#[derive(Default)]
pub struct SharedRouteTable(ArcSwap<RouteTable>);

impl SharedRouteTable {
    pub fn new(t: RouteTable) -> SharedRouteTable {
        SharedRouteTable(ArcSwap::from_pointee(t))
    }

    pub fn load(&self) -> Arc<RouteTable> {
        self.0.load_full()
    }

    pub fn replace(&self, t: RouteTable) {
        self.0.store(Arc::new(t));
    }
}

#[cfg(test)]
mod tests;
