//! Routes (`[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`), the
//! route table built from a deployment, and fan-out with per-endpoint dedup.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::condition::{CompileErrors, Condition};
use crate::message::{Message, MessageSource};
use crate::syntax::{lex, pos_at, SyntaxError, Tok};

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

/// A route source, kept as its lower-cased path segments with trailing `*`
/// and `/` trimmed; it matches a message whose source path starts with the
/// same whole segments (so `/messages/modules/m1*` does not match `m10`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    text: String,
    segments: Vec<String>,
}

impl Source {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn is_twin(&self) -> bool {
        self.segments
            .first()
            .is_some_and(|s| s == "twinchangenotifications")
    }

    fn parse(text: &str) -> Option<Source> {
        let trimmed = text.trim_end_matches(['*', '/']);
        let segments: Vec<String> = trimmed.split('/').skip(1).map(|s| s.to_owned()).collect();
        if !text.starts_with('/') || segments.iter().any(|s| s.is_empty() || s.contains('*')) {
            return None;
        }
        let lower: Vec<String> = segments.iter().map(|s| s.to_lowercase()).collect();
        let kw = |i: usize, w: &str| lower.get(i).map(String::as_str) == Some(w);
        let ok = match lower.len() {
            0 => true,
            1 => kw(0, "messages") || kw(0, "twinchangenotifications"),
            2 => kw(0, "messages") && kw(1, "modules"),
            3 => kw(0, "messages") && kw(1, "modules"),
            4 | 5 => kw(0, "messages") && kw(1, "modules") && kw(3, "outputs"),
            _ => false,
        };
        ok.then(|| Source {
            text: text.to_owned(),
            segments: lower,
        })
    }

    /// Whether a message from `source` is taken by this route source.
    pub fn matches(&self, source: Option<&MessageSource>) -> bool {
        let m: [&str; 5];
        let path: &[&str] = match source {
            None | Some(MessageSource::Telemetry) => &["messages", "events"],
            Some(MessageSource::ModuleOutput { module, output }) => {
                m = ["messages", "modules", module, "outputs", output];
                &m
            }
            Some(MessageSource::TwinChangeNotification) => &["twinchangenotifications"],
        };
        self.segments.len() <= path.len()
            && self
                .segments
                .iter()
                .zip(path)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }
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
                    "invalid source '{src_text}': expected /*, /messages, /messages/*, /messages/modules/<module>[/outputs/<output>|/outputs/*] or /twinChangeNotifications"
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
        let endpoint = parse_sink(text[sink_at..].trim_end())
            .ok_or_else(|| err(name, text, sink_at, "invalid sink: expected $upstream or BrokeredEndpoint(\"/modules/<module>/inputs/<input>\")"))?;
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

fn parse_sink(s: &str) -> Option<Endpoint> {
    if s.eq_ignore_ascii_case("$upstream") {
        return Some(Endpoint::Upstream);
    }
    let prefix = "brokeredendpoint";
    if s.len() <= prefix.len() || !s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let inner = s[prefix.len()..]
        .trim_start()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .trim();
    let path = inner
        .strip_prefix('"')
        .and_then(|p| p.strip_suffix('"'))
        .or_else(|| inner.strip_prefix('\'').and_then(|p| p.strip_suffix('\'')))?;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        ["", modules, m, inputs, i]
            if modules.eq_ignore_ascii_case("modules")
                && inputs.eq_ignore_ascii_case("inputs")
                && !m.is_empty()
                && !i.is_empty() =>
        {
            Some(Endpoint::ModuleInput {
                module: (*m).into(),
                input: (*i).into(),
            })
        }
        _ => None,
    }
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

    /// Builds the table from `$edgeHub` desired properties (schema 1.0 or 1.1):
    /// `routes` maps names to route strings or (1.1) to
    /// `{route, priority 0-9, timeToLiveSecs}`. Every route is checked; all
    /// errors are returned.
    pub fn from_edge_hub_desired(
        desired: &serde_json::Value,
    ) -> Result<RouteTable, Vec<RouteError>> {
        let dep = |m: String| vec![RouteError::Deployment(m)];
        let schema = desired
            .get("schemaVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("1.0");
        let v11 = match schema {
            "1.0" => false,
            "1.1" | "1.2" => true,
            other => {
                return Err(dep(format!(
                    "unsupported schemaVersion '{other}' (expected 1.0, 1.1 or 1.2)"
                )))
            }
        };
        let routes = desired
            .get("routes")
            .and_then(|r| r.as_object())
            .ok_or_else(|| dep("'routes' must be an object of name → route".into()))?;
        let default_ttl_secs = match desired
            .get("storeAndForwardConfiguration")
            .and_then(|s| s.get("timeToLiveSecs"))
        {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| dep("storeAndForwardConfiguration.timeToLiveSecs must be a non-negative integer".into()))?,
            ),
        };
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for (name, spec) in routes {
            let invalid = |message: String| RouteError::Invalid {
                route: name.clone(),
                message,
            };
            let (text, priority, ttl) = match spec {
                serde_json::Value::String(s) => (s.as_str(), DEFAULT_PRIORITY, None),
                serde_json::Value::Object(o) if v11 => {
                    let Some(text) = o.get("route").and_then(|r| r.as_str()) else {
                        errors.push(invalid("'route' must be a string".into()));
                        continue;
                    };
                    let priority = match o.get("priority") {
                        None => DEFAULT_PRIORITY,
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
                        None => None,
                        Some(t) => match t.as_u64().and_then(|t| u32::try_from(t).ok()) {
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
