use super::*;
use crate::message::{Message, SystemProperty};

fn msg() -> Message {
    Message::new(
        r#"{"temp": 31.5, "status": "ok", "tags": ["a", "b"], "n": null, "deep": {"x": {"y": 2}}}"#,
    )
    .with_property("temperature", "50")
    .with_property("alert", "true")
    .with_property("$contentType", "app-wins")
    .with_property("$body.status", "prop-wins")
    .with_system(SystemProperty::ContentType, "application/json")
    .with_system(SystemProperty::ContentEncoding, "utf-8")
    .with_system(SystemProperty::ConnectionDeviceId, "dev1")
    .with_system(SystemProperty::MessageId, "m-1")
}

fn eval(cond: &str) -> Option<bool> {
    Condition::compile(cond)
        .unwrap_or_else(|e| panic!("{cond}: {e}"))
        .evaluate(&msg())
}

#[test]
fn three_valued_logic() {
    let cases: &[(&str, Option<bool>)] = &[
        ("true", Some(true)),
        ("false", Some(false)),
        ("undefined = undefined", None),
        ("null = null", Some(true)),
        ("missing = 'x'", None),
        ("missing = 'x' OR true", Some(true)),
        ("missing = 'x' AND false", Some(false)),
        ("missing = 'x' AND true", None),
        ("NOT (missing = 'x')", None),
        ("NOT false", Some(true)),
        ("temperature = '50'", Some(true)),
        ("temperature <> '50'", Some(false)),
        ("temperature != '50'", Some(false)),
        ("temperature > '49'", Some(true)),
        ("'abc' < 'abd'", Some(true)),
        ("1 + 2 * 3 = 7", Some(true)),
        ("(1 + 2) * 3 = 9", Some(true)),
        ("10 % 4 = 2", Some(true)),
        ("-(2) = 0 - 2", Some(true)),
        ("0x10 = 16", Some(true)),
        ("1.5e2 = 150", Some(true)),
        ("'a' || 'b' = 'ab'", Some(true)),
        ("(missing ?? 'dflt') = 'dflt'", Some(true)),
        ("(temperature ?? 'dflt') = '50'", Some(true)),
        ("true = true", Some(true)),
        ("true > false", Some(true)),
        ("'string condition'", None),
        ("5", None),
        ("a = 'x' /* comment */ OR true", Some(true)),
    ];
    for (cond, want) in cases {
        assert_eq!(eval(cond), *want, "{cond}");
    }
}

#[test]
fn property_resolution() {
    // `$name`: the application property of that name wins over the system property.
    assert_eq!(eval("$contentType = 'app-wins'"), Some(true));
    // `{$name}`: the system property only.
    assert_eq!(eval("{$contentType} = 'application/json'"), Some(true));
    assert_eq!(eval("$connectionDeviceId = 'dev1'"), Some(true));
    assert_eq!(eval("$messageId = 'm-1'"), Some(true));
    assert_eq!(eval("$correlationId = 'x'"), None);
    assert_eq!(eval("$noSuchSystemProperty = 'x'"), None);
    // Application properties are always strings.
    assert_eq!(eval("is_string(temperature)"), Some(true));
    assert_eq!(eval("as_number(temperature) > 40"), Some(true));
}

#[test]
fn body_queries() {
    assert_eq!(eval("$body.temp > 30"), Some(true));
    assert_eq!(eval("$body.temp = 31.5"), Some(true));
    assert_eq!(eval("{$body.status} = 'ok'"), Some(true));
    // An application property named literally `$body.status` wins when not escaped.
    assert_eq!(eval("$body.status = 'prop-wins'"), Some(true));
    assert_eq!(eval("$body.tags[1] = 'b'"), Some(true));
    assert_eq!(eval("$body.deep.x.y = 2"), Some(true));
    assert_eq!(eval("is_null($body.n)"), Some(true));
    // A path the body does not have is null (IoT Edge), so this is false…
    assert_eq!(eval("$body.missing = 1"), Some(false));
    assert_eq!(eval("$body.missing = null"), Some(true));
    // …and comparing an object is undefined.
    assert_eq!(eval("$body.deep = 1"), None);
    assert_eq!(eval("is_defined($body.deep)"), Some(true));
    // Mixed runtime types compare unequal, never error.
    assert_eq!(eval("$body.temp = 'x'"), Some(false));
    // Not JSON per content type: body queries are undefined.
    let plain =
        Message::new(r#"{"temp": 40}"#).with_system(SystemProperty::ContentType, "text/plain");
    let c = Condition::compile("$body.temp > 30").unwrap();
    assert_eq!(c.evaluate(&plain), None);
    // UTF-16 encoded JSON body.
    let body: Vec<u8> = r#"{"v": 7}"#.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let m = Message::new(body)
        .with_system(SystemProperty::ContentType, "application/json")
        .with_system(SystemProperty::ContentEncoding, "utf-16");
    assert_eq!(
        Condition::compile("$body.v = 7").unwrap().evaluate(&m),
        Some(true)
    );
}

#[test]
fn builtins() {
    let cases: &[(&str, Option<bool>)] = &[
        ("abs(-3) = 3", Some(true)),
        ("power(2, 10) = 1024", Some(true)),
        ("square(3) = 9", Some(true)),
        ("ceiling(1.2) = 2", Some(true)),
        ("floor(1.8) = 1", Some(true)),
        ("sign(-5) = -1", Some(true)),
        ("sqrt(16) = 4", Some(true)),
        ("exp(0) = 1", Some(true)),
        ("as_number('12.5') = 12.5", Some(true)),
        ("as_number('nope') = 1", None),
        ("is_bool(true)", Some(true)),
        ("is_number(1)", Some(true)),
        ("is_defined(missing)", Some(false)),
        ("concat('a', 'b', 'c') = 'abc'", Some(true)),
        ("length('héllo') = 5", Some(true)),
        ("lower('AbC') = 'abc'", Some(true)),
        ("upper('AbC') = 'ABC'", Some(true)),
        ("substring('hello', 1) = 'ello'", Some(true)),
        ("substring('hello', 1, 3) = 'ell'", Some(true)),
        ("substring('hello', 9) = 'x'", None),
        ("index_of('hello', 'l') = 2", Some(true)),
        ("index_of('hello', 'z') = -1", Some(true)),
        ("starts_with('hello', 'he')", Some(true)),
        ("ends_with('hello', 'lo')", Some(true)),
        ("contains('hello', 'ell')", Some(true)),
        ("CONTAINS('hello', 'x')", Some(false)),
        ("starts_with(missing, 'x')", None),
    ];
    for (cond, want) in cases {
        assert_eq!(eval(cond), *want, "{cond}");
    }
}

fn compile_err(cond: &str) -> String {
    Condition::compile(cond).expect_err(cond).to_string()
}

#[test]
fn type_errors_are_compile_errors() {
    // One mistake, one error (IoT Edge would also blame the '>' above it).
    assert_eq!(
        compile_err("temperature + 1 > 2"),
        "Invalid operands to binary operator '+': have 'string' and 'number', expected 'number' and 'number' at 1:13"
    );
    // `??` binds loosest: this is `missing ?? ('d' = 'd')`, string ?? bool.
    assert!(
        compile_err("missing ?? 'd' = 'd'").starts_with("Invalid operands to binary operator '??'")
    );
    assert_eq!(
        compile_err("temperature > 50"),
        "Invalid operands to binary operator '>': have 'string' and 'number', expected 'string' and 'string' at 1:13"
    );
    assert!(compile_err("- 'x' = 1").starts_with("Invalid operands to unary operator '-'"));
    assert!(compile_err("NOT 'x'").starts_with("Invalid operands to unary operator 'NOT'"));
    assert!(compile_err("'a' AND true").starts_with("Invalid operands to binary operator 'AND'"));
    assert!(compile_err("1 || 'a' = 'a'").starts_with("Invalid operands to binary operator '||'"));
    assert_eq!(
        compile_err("nosuch(1)"),
        "Invalid built-in function 'nosuch' at 1:1"
    );
    assert_eq!(
        compile_err("abs('x') = 1"),
        "Invalid arguments to built-in function 'abs': abs(string) at 1:1"
    );
    assert!(compile_err("concat('a') = 'a'").contains("concat(string)"));
    assert!(compile_err("twin_change_includes(properties.reported.x)")
        .contains("twinChangeNotifications"));
    // Several errors are all reported.
    let all = compile_err("a + 1 = 2 AND b * 2 = 4");
    assert_eq!(all.matches("Invalid operands").count(), 2, "{all}");
    // Body queries are dynamic: comparisons with numbers compile.
    assert!(Condition::compile("$body.temp > 50").is_ok());
}
