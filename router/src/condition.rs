//! Route conditions: compiled once from the syntax tree into a typed
//! expression tree, evaluated per message with IoT Hub's three-valued logic
//! (a route matches only when its condition is `true`; `undefined` does not).
//!
//! Typing follows IoT Edge's compiler: every expression has a static type
//! (number, string, bool, null, undefined, or the dynamic type of `$body`
//! queries); operators require matching operand types and a mismatch such as
//! arithmetic on a string property is a compile error, not a run-time miss.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::sync::Arc;

use crate::message::{Message, SystemProperty};
use crate::syntax::{Ast, BinOp, Node, Parser, SyntaxError};

/// Static types, as IoT Edge names them in its error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Number,
    String,
    Bool,
    Null,
    Undefined,
    /// A `$body` query: known only when the message arrives.
    Dynamic,
    /// A sub-expression that already failed to compile. It matches anything,
    /// so one mistake is reported once: IoT Edge goes on to report every
    /// operator above it ("have 'undefined' and 'number'"), which only hides
    /// the real cause.
    Error,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Number => "number",
            Type::String => "string",
            Type::Bool => "bool",
            Type::Null => "null",
            Type::Undefined => "undefined",
            Type::Dynamic => "unknown",
            Type::Error => "error",
        }
    }

    fn matches(expected: Type, given: Type) -> bool {
        let supported = |t| matches!(t, Type::Null | Type::Number | Type::String | Type::Bool);
        expected == Type::Error
            || given == Type::Error
            || expected == given
            || (given == Type::Dynamic && supported(expected))
            || (expected == Type::Dynamic && supported(given))
    }
}

/// A run-time value. Strings borrow from the message where they can.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Undefined,
    Null,
    Bool(bool),
    Number(f64),
    String(Cow<'a, str>),
    /// A JSON object or array from the body: defined, but comparisons with
    /// it are undefined.
    Object,
}

impl Value<'_> {
    fn rank(&self) -> u8 {
        match self {
            Value::Undefined => 0,
            Value::Null => 1,
            Value::Bool(_) => 2,
            Value::Number(_) => 3,
            Value::String(_) => 4,
            Value::Object => 5,
        }
    }
}

/// A `$body` path: `a.b[0].c`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Key(Box<str>),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    Abs,
    Exp,
    Power,
    Square,
    Ceiling,
    Floor,
    Sign,
    Sqrt,
    AsNumber,
    IsBool,
    IsDefined,
    IsNull,
    IsNumber,
    IsString,
    Concat,
    Length,
    Lower,
    Upper,
    Substring,
    IndexOf,
    StartsWith,
    EndsWith,
    Contains,
}

impl Builtin {
    fn lookup(name: &str) -> Option<Builtin> {
        use Builtin::*;
        Some(match name.to_ascii_lowercase().as_str() {
            "abs" => Abs,
            "exp" => Exp,
            "power" => Power,
            "square" => Square,
            "ceiling" => Ceiling,
            "floor" => Floor,
            "sign" => Sign,
            "sqrt" => Sqrt,
            "as_number" => AsNumber,
            "is_bool" => IsBool,
            "is_defined" => IsDefined,
            "is_null" => IsNull,
            "is_number" => IsNumber,
            "is_string" => IsString,
            "concat" => Concat,
            "length" => Length,
            "lower" => Lower,
            "upper" => Upper,
            "substring" => Substring,
            "index_of" => IndexOf,
            "starts_with" => StartsWith,
            "ends_with" => EndsWith,
            "contains" => Contains,
            _ => return None,
        })
    }

    /// Accepted argument lists and the result type.
    fn signatures(self) -> (&'static [&'static [Type]], Type) {
        use Builtin::*;
        use Type::*;
        match self {
            Abs | Exp | Square | Ceiling | Floor | Sign | Sqrt => (&[&[Number]], Number),
            Power => (&[&[Number, Number]], Number),
            AsNumber => (&[&[String], &[Number]], Number),
            IsBool | IsDefined | IsNull | IsNumber | IsString => (&[], Bool),
            Concat => (&[], String),
            Length => (&[&[String]], Number),
            Lower | Upper => (&[&[String]], String),
            Substring => (&[&[String, Number], &[String, Number, Number]], String),
            IndexOf => (&[&[String, String]], Number),
            StartsWith | EndsWith | Contains => (&[&[String, String]], Bool),
        }
    }
}

/// A system property: one with a field, or any other by name.
#[derive(Debug, Clone, PartialEq)]
enum SysRef {
    Known(SystemProperty),
    Named(Arc<str>),
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Const(Value<'static>),
    /// An application property.
    App(Arc<str>),
    /// `$name`: the application property `$name` if the message has one,
    /// else the system property (`None`: no such system property).
    AppOrSys(Arc<str>, SysRef),
    Sys(SysRef),
    /// `$body.path`: the application property of that literal name wins.
    AppOrBody(Arc<str>, Vec<Step>),
    Body(Vec<Step>),
    TwinChangeIncludes(Vec<Step>),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Call(Builtin, Vec<Expr>),
}

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
    /// A condition whose static type is null (`null`, `null AND x`) is false;
    /// a null that a `$body` query finds at run time is undefined.
    ty: Type,
}

/// Compile errors of one condition, each positioned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct CompileErrors(pub Vec<SyntaxError>);

/// Compile context: the text errors point into, and whether the route reads
/// twin change notifications (only those may use `twin_change_includes`).
pub(crate) struct Ctx<'a> {
    pub parser: &'a Parser<'a>,
    pub twin_source: bool,
}

impl Condition {
    /// Compiles a stand-alone condition (positions relative to it).
    pub fn compile(text: &str) -> Result<Condition, CompileErrors> {
        Condition::compile_in(text, 0, text, false)
    }

    pub(crate) fn compile_in(
        full: &str,
        base: usize,
        text: &str,
        twin_source: bool,
    ) -> Result<Condition, CompileErrors> {
        let parser = Parser::new(full, base, text);
        if text.trim().is_empty() {
            // IoT Edge compiles an empty condition to undefined.
            return Ok(Condition {
                expr: Expr::Const(Value::Undefined),
                ty: Type::Undefined,
            });
        }
        let ast = Parser::new(full, base, text)
            .parse_condition()
            .map_err(|e| CompileErrors(vec![e]))?;
        let ctx = Ctx {
            parser: &parser,
            twin_source,
        };
        let mut errors = Vec::new();
        let (expr, ty) = compile(&ctx, &ast, &mut errors);
        if errors.is_empty() {
            Ok(Condition { expr, ty })
        } else {
            Err(CompileErrors(errors))
        }
    }

    /// The three-valued result: `Some(true)`, `Some(false)` or `None` (undefined).
    pub fn evaluate(&self, msg: &Message) -> Option<bool> {
        match eval(&self.expr, msg) {
            Value::Bool(b) => Some(b),
            Value::Null if self.ty == Type::Null => Some(false),
            _ => None,
        }
    }

    /// Whether a route with this condition takes the message.
    pub fn matches(&self, msg: &Message) -> bool {
        self.evaluate(msg) == Some(true)
    }

    /// The value of the whole expression (for `edgehub routes test`).
    pub fn value<'a>(&'a self, msg: &'a Message) -> Value<'a> {
        eval(&self.expr, msg)
    }
}

fn operand_error(
    ctx: &Ctx,
    node: &Node,
    op: &str,
    expected: &[Type],
    given: &[Type],
) -> SyntaxError {
    let arity = match expected.len() {
        1 => "unary ",
        2 => "binary ",
        _ => "",
    };
    let list = |ts: &[Type]| {
        ts.iter()
            .map(|t| format!("'{}'", t.name()))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    ctx.parser.error_at(
        node.start,
        format!(
            "Invalid operands to {arity}operator '{op}': have {}, expected {}",
            list(given),
            list(expected)
        ),
    )
}

/// A `$body` path as IoT Edge's JSON-path validator takes it: names
/// separated by `.`, each optionally followed by one `[index]`
/// (`a.b[0].c`). No empty name, no trailing `.`, no quoted or empty
/// brackets, no two indexes in a row.
fn parse_body_path(path: &str) -> Option<Vec<Step>> {
    // The lexer's identifier characters without '.': the separator here.
    let name_char = |c: char| crate::syntax::is_id_char(c) && c != '.';
    let mut steps = Vec::new();
    for seg in path.split('.') {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, Some(rest.strip_suffix(']')?)),
            None => (seg, None),
        };
        if name.is_empty() || !name.chars().all(name_char) {
            return None;
        }
        steps.push(Step::Key(name.into()));
        if let Some(i) = index {
            if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            steps.push(Step::Index(i.parse().ok()?));
        }
    }
    Some(steps)
}

/// The argument of `twin_change_includes`: one identifier (no brackets),
/// a valid path under `properties.reported.`, `properties.desired.` or
/// `tags.`, as IoT Edge's twin-change path validator requires.
fn parse_twin_path(raw: &str) -> Result<Vec<Step>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("expected a property path such as properties.reported.temperature".into());
    }
    let prefixed = ["properties.reported.", "properties.desired.", "tags."]
        .iter()
        .any(|p| raw.len() > p.len() && raw[..p.len()].eq_ignore_ascii_case(p));
    if raw.contains(['[', ']']) || !raw.chars().all(crate::syntax::is_id_char) {
        return Err(format!(
            "'{raw}' is not a property path (names separated by '.', no indexes)"
        ));
    }
    if !prefixed {
        return Err(format!(
            "'{raw}' is not supported. Supported prefixes: 'properties.reported.', 'properties.desired.', 'tags.'"
        ));
    }
    parse_body_path(raw).ok_or_else(|| format!("'{raw}' is not a valid property path"))
}

fn compile(ctx: &Ctx, node: &Node, errors: &mut Vec<SyntaxError>) -> (Expr, Type) {
    let undefined = (Expr::Const(Value::Undefined), Type::Undefined);
    let failed = (Expr::Const(Value::Undefined), Type::Error);
    match &node.ast {
        Ast::Str(s) => (
            Expr::Const(Value::String(Cow::Owned(s.clone()))),
            Type::String,
        ),
        Ast::Num(v) => (Expr::Const(Value::Number(*v)), Type::Number),
        Ast::Bool(b) => (Expr::Const(Value::Bool(*b)), Type::Bool),
        Ast::Null => (Expr::Const(Value::Null), Type::Null),
        Ast::Undefined => undefined,
        Ast::Prop(name) => (Expr::App(name.as_str().into()), Type::String),
        Ast::SysProp(text) | Ast::EscapedSysProp(text) => {
            let escaped = matches!(node.ast, Ast::EscapedSysProp(_));
            let is_body = text.len() > 6 && text[..6].eq_ignore_ascii_case("$body.");
            if is_body {
                match parse_body_path(&text[6..]) {
                    Some(steps) if escaped || text.contains(['[', ']']) => {
                        (Expr::Body(steps), Type::Dynamic)
                    }
                    Some(steps) => (Expr::AppOrBody(text.as_str().into(), steps), Type::Dynamic),
                    None => {
                        errors.push(ctx.parser.error_at(
                            node.start,
                            format!(
                                "Invalid body query '{text}': expected $body.name[index].name… (names separated by '.', each with at most one numeric [index])"
                            ),
                        ));
                        failed
                    }
                }
            } else if text.contains(['[', ']']) {
                undefined
            } else {
                let name = &text[1..];
                let sys = match SystemProperty::from_name(name) {
                    Some(p) => SysRef::Known(p),
                    None => SysRef::Named(name.into()),
                };
                if escaped {
                    (Expr::Sys(sys), Type::String)
                } else {
                    (Expr::AppOrSys(text.as_str().into(), sys), Type::String)
                }
            }
        }
        Ast::Neg(inner) => {
            let (e, t) = compile(ctx, inner, errors);
            if Type::matches(Type::Number, t) {
                (
                    Expr::Neg(Box::new(e)),
                    if t == Type::Dynamic { t } else { Type::Number },
                )
            } else {
                errors.push(operand_error(ctx, node, "-", &[Type::Number], &[t]));
                failed
            }
        }
        Ast::Not(inner) => {
            let (e, t) = compile(ctx, inner, errors);
            let expected = if t == Type::Null {
                Type::Null
            } else {
                Type::Bool
            };
            if t == Type::Null {
                // A null is false in a boolean context: NOT null is true.
                (Expr::Const(Value::Bool(true)), Type::Bool)
            } else if Type::matches(expected, t) {
                (Expr::Not(Box::new(e)), Type::Bool)
            } else {
                errors.push(operand_error(ctx, node, "NOT", &[expected], &[t]));
                failed
            }
        }
        Ast::Bin(op, l, r) => {
            let (le, lt) = compile(ctx, l, errors);
            let (re, rt) = compile(ctx, r, errors);
            let sym = op.symbol();
            let check = |expected: Type, errors: &mut Vec<SyntaxError>| {
                let ok = Type::matches(expected, lt) && Type::matches(expected, rt);
                if !ok {
                    errors.push(operand_error(
                        ctx,
                        node,
                        sym,
                        &[expected, expected],
                        &[lt, rt],
                    ));
                }
                ok
            };
            let dynamic = lt == Type::Dynamic || rt == Type::Dynamic;
            let bin = |ty| {
                (
                    Expr::Bin(*op, Box::new(le.clone()), Box::new(re.clone())),
                    ty,
                )
            };
            match op {
                BinOp::Mul | BinOp::Div | BinOp::Mod | BinOp::Add | BinOp::Sub => {
                    if check(Type::Number, errors) {
                        bin(if dynamic { Type::Dynamic } else { Type::Number })
                    } else {
                        failed
                    }
                }
                BinOp::Concat => {
                    if check(Type::String, errors) {
                        bin(Type::String)
                    } else {
                        failed
                    }
                }
                BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => {
                    if check(lt, errors) {
                        bin(Type::Bool)
                    } else {
                        failed
                    }
                }
                BinOp::And | BinOp::Or => {
                    let logical =
                        |t| matches!(t, Type::Null | Type::Bool | Type::Undefined | Type::Dynamic);
                    // IoT Edge accepts any right operand when the left one is a
                    // body query (its check reads the left type twice); kept
                    // for conformance.
                    let ok = logical(lt) && (logical(rt) || lt == Type::Dynamic);
                    let null_l = lt == Type::Null;
                    let null_r = rt == Type::Null;
                    if ok && *op == BinOp::And && (null_l || null_r) {
                        // IoT Edge: AND with a null operand is null.
                        (Expr::Const(Value::Null), Type::Null)
                    } else if ok && *op == BinOp::Or && null_l && null_r {
                        (Expr::Const(Value::Null), Type::Null)
                    } else if ok && (null_l || null_r) {
                        // OR: a null operand counts as false.
                        let f = || Box::new(Expr::Const(Value::Bool(false)));
                        let l2 = if null_l { f() } else { Box::new(le.clone()) };
                        let r2 = if null_r { f() } else { Box::new(re.clone()) };
                        (Expr::Bin(BinOp::Or, l2, r2), Type::Bool)
                    } else if ok {
                        bin(Type::Bool)
                    } else {
                        errors.push(operand_error(
                            ctx,
                            node,
                            sym,
                            &[Type::Bool, Type::Bool],
                            &[lt, rt],
                        ));
                        failed
                    }
                }
                BinOp::Coalesce => {
                    if check(lt, errors) {
                        if lt == Type::Undefined {
                            (re, rt)
                        } else {
                            bin(lt)
                        }
                    } else {
                        failed
                    }
                }
            }
        }
        Ast::Call(name, args, raw) => {
            if name.eq_ignore_ascii_case("twin_change_includes") {
                if !ctx.twin_source {
                    errors.push(ctx.parser.error_at(
                        node.start,
                        format!("Invalid built-in function '{name}' (only for routes FROM /twinChangeNotifications)"),
                    ));
                    return failed;
                }
                let parsed = if args.len() == 1 {
                    parse_twin_path(raw)
                } else {
                    Err("expected one property path such as properties.reported.temperature".into())
                };
                return match parsed {
                    Ok(steps) => (Expr::TwinChangeIncludes(steps), Type::Bool),
                    Err(why) => {
                        errors.push(ctx.parser.error_at(
                            node.start,
                            format!("Invalid arguments to built-in function '{name}': {why}"),
                        ));
                        failed
                    }
                };
            }
            let Some(builtin) = Builtin::lookup(name) else {
                errors.push(
                    ctx.parser
                        .error_at(node.start, format!("Invalid built-in function '{name}'")),
                );
                return undefined;
            };
            let compiled: Vec<(Expr, Type)> =
                args.iter().map(|a| compile(ctx, a, errors)).collect();
            let given: Vec<Type> = compiled.iter().map(|(_, t)| *t).collect();
            let (sigs, result) = builtin.signatures();
            let ok = match builtin {
                Builtin::IsBool
                | Builtin::IsDefined
                | Builtin::IsNull
                | Builtin::IsNumber
                | Builtin::IsString => given.len() == 1,
                Builtin::Concat => {
                    given.len() >= 2 && given.iter().all(|t| Type::matches(Type::String, *t))
                }
                _ => sigs.iter().any(|sig| {
                    sig.len() == given.len()
                        && sig.iter().zip(&given).all(|(e, g)| Type::matches(*e, *g))
                }),
            };
            if !ok {
                let list = given
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ");
                errors.push(ctx.parser.error_at(
                    node.start,
                    format!("Invalid arguments to built-in function '{name}': {name}({list})"),
                ));
                return failed;
            }
            (
                Expr::Call(builtin, compiled.into_iter().map(|(e, _)| e).collect()),
                result,
            )
        }
    }
}

fn json_value(v: &serde_json::Value) -> Value<'_> {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n.as_f64().map_or(Value::Undefined, Value::Number),
        serde_json::Value::String(s) => Value::String(Cow::Borrowed(s)),
        _ => Value::Object,
    }
}

fn walk<'a>(root: &'a serde_json::Value, steps: &[Step]) -> Option<&'a serde_json::Value> {
    let mut v = root;
    for s in steps {
        v = match s {
            Step::Key(k) => v.as_object()?.get(&**k)?,
            Step::Index(i) => v.as_array()?.get(*i)?,
        };
    }
    Some(v)
}

/// A `$body` query: undefined when the body is not JSON (by content type and
/// encoding); a path the JSON does not have is null, as in IoT Edge
/// (`$body.missing = null` is true, `$body.missing <> '1'` is true).
fn body<'a>(msg: &'a Message, steps: &[Step]) -> Value<'a> {
    match msg.body_json() {
        None => Value::Undefined,
        Some(j) => walk(j, steps).map_or(Value::Null, json_value),
    }
}

fn sys<'a>(msg: &'a Message, p: &SysRef) -> Value<'a> {
    let v = match p {
        SysRef::Known(p) => msg.system(*p),
        SysRef::Named(n) => msg.other_system(n),
    };
    match v {
        Some(v) => Value::String(Cow::Borrowed(v)),
        None => Value::Undefined,
    }
}

fn compare(op: BinOp, l: &Value, r: &Value) -> Value<'static> {
    use Value::*;
    let ord = match (l, r) {
        (Undefined, _) | (_, Undefined) => return Undefined,
        (Null, Null) => Ordering::Equal,
        // NaN is undefined, as in IoT Edge; infinities compare normally.
        (Number(a), Number(b)) => match a.partial_cmp(b) {
            Some(o) => o,
            None => return Undefined,
        },
        (String(a), String(b)) => a.cmp(b),
        (Bool(a), Bool(b)) => a.cmp(b),
        // JSON objects and arrays have no value to compare.
        (Object, _) | (_, Object) => return Undefined,
        _ => l.rank().cmp(&r.rank()),
    };
    Bool(match op {
        BinOp::Eq => ord == Ordering::Equal,
        BinOp::Ne => ord != Ordering::Equal,
        BinOp::Lt => ord == Ordering::Less,
        BinOp::Le => ord != Ordering::Greater,
        BinOp::Gt => ord == Ordering::Greater,
        BinOp::Ge => ord != Ordering::Less,
        _ => unreachable!("comparison operator"),
    })
}

/// NaN is not a number the language can talk about: it is undefined
/// (`3 % 0`, `sqrt(-4)`). Infinities are defined.
fn number(v: f64) -> Value<'static> {
    if v.is_nan() {
        Value::Undefined
    } else {
        Value::Number(v)
    }
}

fn truth(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Results borrow from the compiled expression and the message, so string
/// constants and properties are compared without allocating.
fn eval<'a>(e: &'a Expr, msg: &'a Message) -> Value<'a> {
    match e {
        Expr::Const(Value::String(s)) => Value::String(Cow::Borrowed(s.as_ref())),
        Expr::Const(v) => v.clone(),
        Expr::App(name) => match msg.property(name) {
            Some(v) => Value::String(Cow::Borrowed(v)),
            None => Value::Undefined,
        },
        Expr::AppOrSys(name, p) => match msg.property(name) {
            Some(v) => Value::String(Cow::Borrowed(v)),
            None => sys(msg, p),
        },
        Expr::Sys(p) => sys(msg, p),
        Expr::AppOrBody(name, steps) => match msg.property(name) {
            Some(v) => Value::String(Cow::Borrowed(v)),
            None => body(msg, steps),
        },
        Expr::Body(steps) => body(msg, steps),
        Expr::TwinChangeIncludes(steps) => {
            let Some(body) = msg.body_json() else {
                return Value::Undefined;
            };
            // As IoT Edge: a present, non-null value is a change; a
            // missing or null one is not.
            Value::Bool(walk(body, steps).is_some_and(|v| !v.is_null()))
        }
        Expr::Neg(inner) => match eval(inner, msg) {
            Value::Number(v) => number(-v),
            _ => Value::Undefined,
        },
        Expr::Not(inner) => match eval(inner, msg) {
            Value::Bool(b) => Value::Bool(!b),
            _ => Value::Undefined,
        },
        Expr::Bin(op, l, r) => match op {
            BinOp::And => {
                let a = truth(&eval(l, msg));
                if a == Some(false) {
                    return Value::Bool(false);
                }
                match (a, truth(&eval(r, msg))) {
                    (_, Some(false)) => Value::Bool(false),
                    (Some(true), Some(true)) => Value::Bool(true),
                    _ => Value::Undefined,
                }
            }
            BinOp::Or => {
                let a = truth(&eval(l, msg));
                if a == Some(true) {
                    return Value::Bool(true);
                }
                match (a, truth(&eval(r, msg))) {
                    (_, Some(true)) => Value::Bool(true),
                    (Some(false), Some(false)) => Value::Bool(false),
                    _ => Value::Undefined,
                }
            }
            BinOp::Coalesce => match eval(l, msg) {
                Value::Undefined => eval(r, msg),
                v => v,
            },
            BinOp::Concat => match (eval(l, msg), eval(r, msg)) {
                (Value::String(a), Value::String(b)) => {
                    Value::String(Cow::Owned(format!("{a}{b}")))
                }
                _ => Value::Undefined,
            },
            BinOp::Mul | BinOp::Div | BinOp::Mod | BinOp::Add | BinOp::Sub => {
                match (eval(l, msg), eval(r, msg)) {
                    (Value::Number(a), Value::Number(b)) => number(match op {
                        BinOp::Mul => a * b,
                        BinOp::Div => a / b,
                        BinOp::Mod => a % b,
                        BinOp::Add => a + b,
                        _ => a - b,
                    }),
                    _ => Value::Undefined,
                }
            }
            _ => compare(*op, &eval(l, msg), &eval(r, msg)),
        },
        Expr::Call(b, args) => call(*b, args, msg),
    }
}

fn call<'a>(b: Builtin, args: &'a [Expr], msg: &'a Message) -> Value<'a> {
    use Builtin::*;
    let vals: Vec<Value<'a>> = args.iter().map(|a| eval(a, msg)).collect();
    let num = |i: usize| match vals.get(i) {
        Some(Value::Number(v)) => Some(*v),
        _ => None,
    };
    let text = |i: usize| match vals.get(i) {
        Some(Value::String(s)) => Some(s.as_ref()),
        _ => None,
    };
    let n = |v: Option<f64>| v.map_or(Value::Undefined, number);
    let bool_of = |v: Option<bool>| v.map_or(Value::Undefined, Value::Bool);
    match b {
        Abs => n(num(0).map(f64::abs)),
        Exp => n(num(0).map(f64::exp)),
        Power => n(num(0).zip(num(1)).map(|(a, b)| a.powf(b))),
        Square => n(num(0).map(|a| a * a)),
        Ceiling => n(num(0).map(f64::ceil)),
        Floor => n(num(0).map(f64::floor)),
        Sign => n(num(0).map(|a| {
            if a > 0.0 {
                1.0
            } else if a < 0.0 {
                -1.0
            } else {
                0.0
            }
        })),
        Sqrt => n(num(0).map(f64::sqrt)),
        AsNumber => match &vals[0] {
            Value::Number(v) => number(*v),
            Value::String(s) => n(s.trim().parse::<f64>().ok()),
            _ => Value::Undefined,
        },
        IsBool => Value::Bool(matches!(vals[0], Value::Bool(_))),
        IsDefined => Value::Bool(!matches!(vals[0], Value::Undefined)),
        IsNull => Value::Bool(matches!(vals[0], Value::Null)),
        // Infinity is defined but is not a number here (`is_number(3 / 0)`).
        IsNumber => Value::Bool(matches!(vals[0], Value::Number(v) if v.is_finite())),
        IsString => Value::Bool(matches!(vals[0], Value::String(_))),
        Concat => {
            let mut out = String::new();
            for v in &vals {
                match v {
                    Value::String(s) => out.push_str(s),
                    _ => return Value::Undefined,
                }
            }
            Value::String(Cow::Owned(out))
        }
        Length => n(text(0).map(|s| utf16_len(s) as f64)),
        Lower => text(0).map_or(Value::Undefined, |s| {
            Value::String(Cow::Owned(s.to_lowercase()))
        }),
        Upper => text(0).map_or(Value::Undefined, |s| {
            Value::String(Cow::Owned(s.to_uppercase()))
        }),
        Substring => {
            let (Some(s), Some(start)) = (text(0), num(1)) else {
                return Value::Undefined;
            };
            let units: Vec<u16> = s.encode_utf16().collect();
            if start < 0.0 || start.fract() != 0.0 || start as usize > units.len() {
                return Value::Undefined;
            }
            let start = start as usize;
            let end = match vals.get(2) {
                None => units.len(),
                Some(Value::Number(len)) if *len >= 0.0 && len.fract() == 0.0 => {
                    (start + *len as usize).min(units.len())
                }
                _ => return Value::Undefined,
            };
            String::from_utf16(&units[start..end])
                .map_or(Value::Undefined, |s| Value::String(Cow::Owned(s)))
        }
        IndexOf => match (text(0), text(1)) {
            (Some(s), Some(sub)) => Value::Number(match s.find(sub) {
                Some(byte) => utf16_len(&s[..byte]) as f64,
                None => -1.0,
            }),
            _ => Value::Undefined,
        },
        StartsWith => bool_of(text(0).zip(text(1)).map(|(s, p)| s.starts_with(p))),
        EndsWith => bool_of(text(0).zip(text(1)).map(|(s, p)| s.ends_with(p))),
        Contains => bool_of(text(0).zip(text(1)).map(|(s, p)| s.contains(p))),
    }
}

#[cfg(test)]
mod tests;
