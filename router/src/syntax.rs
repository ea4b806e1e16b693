//! Lexer and parser for route conditions, replicating IoT Edge's ANTLR
//! grammar (Routing.Core `GrammarLexer.g4`, `Condition.g4`): at each position
//! the longest token wins, ties go to the rule listed first. That makes some
//! surprising but conformant readings: `a+b` and `5-1` are single identifiers
//! (identifier characters include digits and `+ - * . ! $`), so arithmetic
//! needs spaces; `5 -1` is two integer literals (`5` and `-1`, a syntax
//! error); `$a.b[0]` is one system-property token.

use std::fmt;

/// A position in the source text, 1-based, as IoT Edge reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Converts byte offsets into line:column for one source text.
pub(crate) fn pos_at(src: &str, offset: usize) -> Pos {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() as u32 + 1;
    let col_start = before.rfind('\n').map_or(0, |i| i + 1);
    Pos {
        line,
        column: before[col_start..].chars().count() as u32 + 1,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Select,
    From,
    Where,
    Into,
    Str(String),
    UnterminatedStr,
    Int(f64),
    Hex(f64),
    Real(f64),
    True,
    False,
    Null,
    Undefined,
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Mul,
    Div,
    Mod,
    And,
    Or,
    Not,
    Eq,
    Ne,
    Le,
    Ge,
    Gt,
    Lt,
    Concat,
    Coalesce,
    LBrace,
    RBrace,
    SysProp(String),
    Id(String),
    /// A run of path characters that is neither an identifier nor `$…`.
    QueryPath(String),
    Unknown(char),
}

impl Tok {
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Str(s) => format!("string '{s}'"),
            Tok::Int(_) | Tok::Hex(_) | Tok::Real(_) => "number".into(),
            Tok::SysProp(s) | Tok::Id(s) | Tok::QueryPath(s) => format!("'{s}'"),
            Tok::Unknown(c) => format!("'{c}'"),
            other => format!("'{}'", other.text()),
        }
    }

    fn text(&self) -> &'static str {
        match self {
            Tok::Select => "SELECT",
            Tok::From => "FROM",
            Tok::Where => "WHERE",
            Tok::Into => "INTO",
            Tok::True => "true",
            Tok::False => "false",
            Tok::Null => "null",
            Tok::Undefined => "undefined",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::Comma => ",",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Mul => "*",
            Tok::Div => "/",
            Tok::Mod => "%",
            Tok::And => "AND",
            Tok::Or => "OR",
            Tok::Not => "NOT",
            Tok::Eq => "=",
            Tok::Ne => "!=",
            Tok::Le => "<=",
            Tok::Ge => ">=",
            Tok::Gt => ">",
            Tok::Lt => "<",
            Tok::Concat => "||",
            Tok::Coalesce => "??",
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::UnterminatedStr => "unterminated string",
            _ => "token",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub tok: Tok,
    /// Byte offsets into the source.
    pub start: usize,
    pub end: usize,
}

/// Characters a query path may not contain (`QUERY_PATH_CHARS`).
fn is_path_char(c: char) -> bool {
    !matches!(
        c,
        '(' | ')'
            | '<'
            | '>'
            | '@'
            | ','
            | ';'
            | ':'
            | '\\'
            | '"'
            | '/'
            | '?'
            | '='
            | '{'
            | '}'
            | ' '
            | '\t'
            | '\n'
            | '\r'
    )
}

/// Identifier characters: path characters minus `[` and `]` (`ID_CHARS`).
pub(crate) fn is_id_char(c: char) -> bool {
    is_path_char(c) && c != '[' && c != ']'
}

fn run(s: &str, f: impl Fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|(_, c)| !f(*c))
        .map_or(s.len(), |(i, _)| i)
}

fn digits(s: &str) -> usize {
    run(s, |c| c.is_ascii_digit())
}

fn exp_len(s: &str) -> usize {
    let b = s.as_bytes();
    if b.first().is_some_and(|c| *c == b'e' || *c == b'E') {
        let sign = usize::from(b.get(1).is_some_and(|c| *c == b'+' || *c == b'-'));
        let d = digits(&s[1 + sign..]);
        if d > 0 {
            return 1 + sign + d;
        }
    }
    0
}

/// (length, unescaped value, terminated) of a quoted string at the start of `s`.
fn string_len(s: &str) -> Option<(usize, String, bool)> {
    let quote = s.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let mut out = String::new();
    let mut it = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = it.next() {
        if c == quote {
            return Some((i + 1, out, true));
        }
        if c == '\\' {
            match it.peek().map(|(_, c)| *c) {
                Some(e @ ('"' | '\'' | '\\')) => {
                    out.push(e);
                    it.next();
                }
                Some('u') | Some('U') => {
                    let hex: String = s[i + 2..].chars().take(4).collect();
                    match (hex.len() == 4)
                        .then(|| u32::from_str_radix(&hex, 16).ok())
                        .flatten()
                    {
                        Some(v) => {
                            out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                            for _ in 0..5 {
                                it.next();
                            }
                        }
                        // Not an escape the grammar knows: the string ends here.
                        None => return Some((i, out, false)),
                    }
                }
                _ => return Some((i, out, false)),
            }
        } else {
            out.push(c);
        }
    }
    Some((s.len(), out, false))
}

fn keyword(s: &str, kw: &str) -> usize {
    if s.len() >= kw.len() && s.as_bytes()[..kw.len()].eq_ignore_ascii_case(kw.as_bytes()) {
        kw.len()
    } else {
        0
    }
}

fn exact(s: &str, kw: &str) -> usize {
    if s.starts_with(kw) {
        kw.len()
    } else {
        0
    }
}

/// Splits `src` into tokens; whitespace and `/* */` comments are dropped.
pub(crate) fn lex(src: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < src.len() {
        let s = &src[i..];
        let ws = run(s, |c| matches!(c, ' ' | '\t' | '\r' | '\n'));
        if ws > 0 {
            i += ws;
            continue;
        }
        if let Some(body) = s.strip_prefix("/*") {
            if let Some(end) = body.find("*/") {
                i += end + 4;
                continue;
            }
        }
        // Candidates in rule order; the longest wins, the first on a tie.
        let mut best: (usize, Option<Tok>) = (0, None);
        let mut offer = |len: usize, make: &dyn Fn() -> Tok| {
            if len > best.0 {
                best = (len, Some(make()));
            }
        };
        offer(keyword(s, "select"), &|| Tok::Select);
        offer(keyword(s, "from"), &|| Tok::From);
        offer(keyword(s, "where"), &|| Tok::Where);
        offer(keyword(s, "into"), &|| Tok::Into);
        if let Some((len, value, terminated)) = string_len(s) {
            if terminated {
                offer(len, &|| Tok::Str(value.clone()));
            } else {
                offer(len, &|| Tok::UnterminatedStr);
            }
        }
        let neg = usize::from(s.starts_with('-'));
        let int = digits(&s[neg..]);
        if int > 0 {
            offer(neg + int, &|| {
                Tok::Int(s[..neg + int].parse().unwrap_or(f64::NAN))
            });
        }
        if s.len() > 2 && (s.starts_with("0x") || s.starts_with("0X")) {
            let h = run(&s[2..], |c| c.is_ascii_hexdigit());
            if h > 0 {
                offer(2 + h, &|| {
                    Tok::Hex(i64::from_str_radix(&s[2..2 + h], 16).map_or(f64::NAN, |v| v as f64))
                });
            }
        }
        {
            let lead = digits(&s[neg..]);
            let after = neg + lead;
            let mut real = 0;
            if s[after..].starts_with('.') {
                let frac = digits(&s[after + 1..]);
                if frac > 0 {
                    real = after + 1 + frac;
                    real += exp_len(&s[real..]);
                }
            }
            if real == 0 {
                let e = exp_len(&s[after..]);
                if e > 0 {
                    real = after + e;
                }
            }
            if real > 0 {
                offer(real, &|| Tok::Real(s[..real].parse().unwrap_or(f64::NAN)));
            }
        }
        offer(exact(s, "true"), &|| Tok::True);
        offer(exact(s, "false"), &|| Tok::False);
        offer(exact(s, "null"), &|| Tok::Null);
        offer(exact(s, "undefined"), &|| Tok::Undefined);
        for (text, tok) in [
            ("(", Tok::LParen),
            (")", Tok::RParen),
            (",", Tok::Comma),
            ("+", Tok::Plus),
            ("-", Tok::Minus),
            ("*", Tok::Mul),
            ("/", Tok::Div),
            ("%", Tok::Mod),
        ] {
            offer(exact(s, text), &|| tok.clone());
        }
        offer(keyword(s, "and"), &|| Tok::And);
        offer(keyword(s, "or"), &|| Tok::Or);
        offer(keyword(s, "not"), &|| Tok::Not);
        for (text, tok) in [
            ("=", Tok::Eq),
            ("!=", Tok::Ne),
            ("<>", Tok::Ne),
            ("<=", Tok::Le),
            (">=", Tok::Ge),
            (">", Tok::Gt),
            ("<", Tok::Lt),
            ("||", Tok::Concat),
            ("??", Tok::Coalesce),
            ("{", Tok::LBrace),
            ("}", Tok::RBrace),
        ] {
            offer(exact(s, text), &|| tok.clone());
        }
        if let Some(rest) = s.strip_prefix('$') {
            let p = run(rest, is_path_char);
            if p > 0 {
                offer(1 + p, &|| Tok::SysProp(s[..1 + p].to_owned()));
            }
        }
        let id = run(s, is_id_char);
        if id > 0 {
            offer(id, &|| Tok::Id(s[..id].to_owned()));
        }
        let qp = run(s, is_path_char);
        if qp > 0 {
            offer(qp, &|| Tok::QueryPath(s[..qp].to_owned()));
        }
        let (len, tok) = match best {
            (len, Some(tok)) if len > 0 => (len, tok),
            _ => {
                let c = s.chars().next().expect("non-empty");
                (c.len_utf8(), Tok::Unknown(c))
            }
        };
        out.push(Token {
            tok,
            start: i,
            end: i + len,
        });
        i += len;
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    Mod,
    Add,
    Sub,
    Concat,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Coalesce,
}

impl BinOp {
    /// Higher binds tighter, in the order of `Condition.g4`'s alternatives.
    fn precedence(self) -> u8 {
        match self {
            BinOp::Mul | BinOp::Div | BinOp::Mod => 7,
            BinOp::Add | BinOp::Sub | BinOp::Concat => 6,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 5,
            BinOp::Eq | BinOp::Ne => 4,
            BinOp::And => 3,
            BinOp::Or => 2,
            BinOp::Coalesce => 1,
        }
    }

    fn from_tok(t: &Tok) -> Option<BinOp> {
        Some(match t {
            Tok::Mul => BinOp::Mul,
            Tok::Div => BinOp::Div,
            Tok::Mod => BinOp::Mod,
            Tok::Plus => BinOp::Add,
            Tok::Minus => BinOp::Sub,
            Tok::Concat => BinOp::Concat,
            Tok::Lt => BinOp::Lt,
            Tok::Le => BinOp::Le,
            Tok::Gt => BinOp::Gt,
            Tok::Ge => BinOp::Ge,
            Tok::Eq => BinOp::Eq,
            Tok::Ne => BinOp::Ne,
            Tok::And => BinOp::And,
            Tok::Or => BinOp::Or,
            Tok::Coalesce => BinOp::Coalesce,
            _ => return None,
        })
    }

    pub(crate) fn symbol(self) -> &'static str {
        match self {
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Mod => "%",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Concat => "||",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "=",
            BinOp::Ne => "!=",
            BinOp::And => "AND",
            BinOp::Or => "OR",
            BinOp::Coalesce => "??",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ast {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    Undefined,
    /// Application property (`temperature`).
    Prop(String),
    /// `$name`: an application property of that name if present, else the
    /// system property, or a body query for `$body.…`.
    SysProp(String),
    /// `{$name}`: the system property (or body query) only.
    EscapedSysProp(String),
    Neg(Box<Node>),
    Not(Box<Node>),
    Bin(BinOp, Box<Node>, Box<Node>),
    /// Function name, arguments, and the raw argument text (body-query
    /// builtins such as `twin_change_includes` take their argument as text).
    Call(String, Vec<Node>, String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub ast: Ast,
    /// Byte span of the operator or token to blame in errors.
    pub start: usize,
    pub end: usize,
}

/// A parse or compile error, positioned in the route or condition text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at {pos}")]
pub struct SyntaxError {
    pub message: String,
    pub pos: Pos,
}

pub(crate) struct Parser<'a> {
    src: &'a str,
    toks: Vec<Token>,
    at: usize,
    /// Offset of `src` inside the text positions are reported against.
    base: usize,
    full: &'a str,
}

impl<'a> Parser<'a> {
    /// `src` is the condition; `full` the text it sits in (the whole route)
    /// starting at byte `base`, so errors point into what the user wrote.
    pub(crate) fn new(full: &'a str, base: usize, src: &'a str) -> Parser<'a> {
        Parser {
            src,
            toks: lex(src),
            at: 0,
            base,
            full,
        }
    }

    pub(crate) fn error_at(&self, offset: usize, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            message: message.into(),
            pos: pos_at(self.full, self.base + offset),
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.at)
    }

    fn end_offset(&self) -> usize {
        self.src.trim_end().len()
    }

    fn unexpected(&self, expected: &str) -> SyntaxError {
        match self.peek() {
            Some(t) => self.error_at(
                t.start,
                format!(
                    "Syntax error: expected {expected}, found {}",
                    t.tok.describe()
                ),
            ),
            None => self.error_at(
                self.end_offset(),
                format!("Syntax error: expected {expected}, found end of condition"),
            ),
        }
    }

    /// The whole condition.
    pub(crate) fn parse_condition(mut self) -> Result<Node, SyntaxError> {
        if self.toks.is_empty() {
            return Err(self.error_at(0, "Syntax error: empty condition"));
        }
        let e = self.expr(0)?;
        if let Some(t) = self.peek() {
            return Err(match t.tok {
                Tok::RParen => self.error_at(t.start, "Syntax error: unmatched closing ')'"),
                Tok::Unknown(c) => {
                    self.error_at(t.start, format!("Syntax error: invalid symbol '{c}'"))
                }
                _ => self.error_at(
                    t.start,
                    format!(
                        "Syntax error: expected an operator, found {}{}",
                        t.tok.describe(),
                        if matches!(t.tok, Tok::Int(v) | Tok::Real(v) if v < 0.0) {
                            " (a '-' right before a digit is read as a negative number; put a space after the '-')"
                        } else {
                            ""
                        }
                    ),
                ),
            });
        }
        Ok(e)
    }

    fn expr(&mut self, min_prec: u8) -> Result<Node, SyntaxError> {
        let mut left = self.unary()?;
        while let Some(op) = self.peek().and_then(|t| BinOp::from_tok(&t.tok)) {
            let prec = op.precedence();
            if prec <= min_prec {
                break;
            }
            let t = self.toks[self.at].clone();
            self.at += 1;
            let right = self.expr(prec)?;
            left = Node {
                ast: Ast::Bin(op, Box::new(left), Box::new(right)),
                start: t.start,
                end: t.end,
            };
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Node, SyntaxError> {
        let Some(t) = self.peek().cloned() else {
            return Err(self.unexpected("an expression"));
        };
        self.at += 1;
        let node = |ast| Node {
            ast,
            start: t.start,
            end: t.end,
        };
        Ok(match t.tok {
            Tok::Minus => node(Ast::Neg(Box::new(self.unary()?))),
            Tok::Not => node(Ast::Not(Box::new(self.unary()?))),
            Tok::LParen => {
                let e = self.expr(0)?;
                match self.peek() {
                    Some(Token {
                        tok: Tok::RParen, ..
                    }) => {
                        self.at += 1;
                        e
                    }
                    Some(_) => return Err(self.unexpected("')'")),
                    None => return Err(self.error_at(t.start, "Syntax error: missing closing ')'")),
                }
            }
            Tok::Str(s) => node(Ast::Str(s)),
            Tok::UnterminatedStr => {
                return Err(self.error_at(t.start, "Syntax error: unterminated string"))
            }
            Tok::Int(v) | Tok::Hex(v) | Tok::Real(v) => node(Ast::Num(v)),
            Tok::True => node(Ast::Bool(true)),
            Tok::False => node(Ast::Bool(false)),
            Tok::Null => node(Ast::Null),
            Tok::Undefined => node(Ast::Undefined),
            Tok::SysProp(s) => node(Ast::SysProp(s)),
            Tok::LBrace => {
                let inner = match self.peek().cloned() {
                    Some(Token {
                        tok: Tok::SysProp(s),
                        ..
                    }) => s,
                    _ => return Err(self.unexpected("a '$' property after '{'")),
                };
                self.at += 1;
                match self.peek() {
                    Some(Token {
                        tok: Tok::RBrace, ..
                    }) => self.at += 1,
                    _ => return Err(self.unexpected("'}'")),
                }
                node(Ast::EscapedSysProp(inner))
            }
            Tok::Id(name) => {
                if matches!(
                    self.peek(),
                    Some(Token {
                        tok: Tok::LParen,
                        ..
                    })
                ) {
                    let open = self.toks[self.at].end;
                    self.at += 1;
                    let mut args = Vec::new();
                    if !matches!(
                        self.peek(),
                        Some(Token {
                            tok: Tok::RParen,
                            ..
                        })
                    ) {
                        loop {
                            args.push(self.expr(0)?);
                            match self.peek() {
                                Some(Token {
                                    tok: Tok::Comma, ..
                                }) => self.at += 1,
                                _ => break,
                            }
                        }
                    }
                    let close = match self.peek() {
                        Some(Token {
                            tok: Tok::RParen,
                            start,
                            ..
                        }) => *start,
                        Some(_) => return Err(self.unexpected("',' or ')'")),
                        None => {
                            return Err(self.error_at(t.start, "Syntax error: missing closing ')'"))
                        }
                    };
                    self.at += 1;
                    let raw: String = self.src[open..close]
                        .chars()
                        .filter(|c| !c.is_whitespace())
                        .collect();
                    node(Ast::Call(name, args, raw))
                } else {
                    node(Ast::Prop(name))
                }
            }
            Tok::Unknown(c) => {
                return Err(self.error_at(t.start, format!("Syntax error: invalid symbol '{c}'")))
            }
            Tok::RParen => {
                return Err(self.error_at(t.start, "Syntax error: unmatched closing ')'"))
            }
            _ => {
                self.at -= 1;
                return Err(self.unexpected("an expression"));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        lex(s).into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn longest_match_like_antlr() {
        assert_eq!(toks("a+b"), vec![Tok::Id("a+b".into())]);
        assert_eq!(toks("5-1"), vec![Tok::Id("5-1".into())]);
        assert_eq!(toks("5 -1"), vec![Tok::Int(5.0), Tok::Int(-1.0)]);
        assert_eq!(
            toks("5 - 1"),
            vec![Tok::Int(5.0), Tok::Minus, Tok::Int(1.0)]
        );
        assert_eq!(toks("1.5e3"), vec![Tok::Real(1500.0)]);
        assert_eq!(toks("123abc"), vec![Tok::Id("123abc".into())]);
        assert_eq!(toks("0x1F"), vec![Tok::Hex(31.0)]);
        assert_eq!(toks("android"), vec![Tok::Id("android".into())]);
        assert_eq!(toks("AnD"), vec![Tok::And]);
        assert_eq!(toks("TRUE"), vec![Tok::Id("TRUE".into())]);
        assert_eq!(toks("$body.a[0]"), vec![Tok::SysProp("$body.a[0]".into())]);
        assert_eq!(
            toks("'it\\'s' \"\\u0041\""),
            vec![Tok::Str("it's".into()), Tok::Str("A".into())]
        );
        assert_eq!(
            toks("a /* c */ = 1"),
            vec![Tok::Id("a".into()), Tok::Eq, Tok::Int(1.0)]
        );
        assert_eq!(toks("'open"), vec![Tok::UnterminatedStr]);
        assert_eq!(
            toks("a<>b"),
            vec![Tok::Id("a".into()), Tok::Ne, Tok::Id("b".into())]
        );
    }

    fn parse(s: &str) -> Result<Node, SyntaxError> {
        Parser::new(s, 0, s).parse_condition()
    }

    #[test]
    fn precedence_follows_the_grammar() {
        let n = parse("a = 'x' OR b = 'y' AND NOT c = 'z'").unwrap();
        // OR at the top; AND binds tighter; NOT binds tighter than '='.
        let Ast::Bin(BinOp::Or, _, right) = n.ast else {
            panic!()
        };
        let Ast::Bin(BinOp::And, _, r2) = right.ast else {
            panic!()
        };
        let Ast::Bin(BinOp::Eq, l3, _) = r2.ast else {
            panic!()
        };
        assert!(matches!(l3.ast, Ast::Not(_)));
        let n = parse("1 + 2 * 3 ?? 4").unwrap();
        assert!(matches!(n.ast, Ast::Bin(BinOp::Coalesce, _, _)));
    }

    #[test]
    fn errors_are_positioned() {
        let e = parse("a = (1").unwrap_err();
        assert_eq!(e.to_string(), "Syntax error: missing closing ')' at 1:5");
        let e = parse("a = 1)").unwrap_err();
        assert_eq!(e.to_string(), "Syntax error: unmatched closing ')' at 1:6");
        let e = parse("a = 'x").unwrap_err();
        assert_eq!(e.to_string(), "Syntax error: unterminated string at 1:5");
        let e = parse("a = ").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Syntax error: expected an expression"),
            "{e}"
        );
        let e = parse("a = 1 @ 2").unwrap_err();
        assert_eq!(e.to_string(), "Syntax error: invalid symbol '@' at 1:7");
        // '#' and '~' are identifier characters in this grammar.
        assert!(parse("a = #").is_ok());
        let e = parse("x = 5 -1").unwrap_err();
        assert!(e.to_string().contains("negative number"), "{e}");
        let e = parse("a =\n  ").unwrap_err();
        assert!(e.to_string().contains("end of condition"), "{e}");
    }
}
