//! Price expressions computed from the request, e.g. `width * height * steps / 1000000`,
//! `pages * 0.01`, `header("x-upstream-cost") * 1.2`.
//!
//! A tiny own parser rather than a CEL crate: the filter ships as a wasm module that
//! must stay small (≤ 400 KB) and every CEL implementation in Rust pulls in a parser
//! generator runtime, regex and chrono, several times the size of this module. CEL's
//! numbers are also `f64`/`i64`, while money needs exact decimals. The language is
//! deliberately small and checked at config load:
//!
//! - numbers (`0.10`, `60`), `+ - * /`, unary `-`, parentheses;
//! - a bare name (`width`, `input.pages`) is a number field of the JSON request body
//!   (dots walk into objects); `body("a.b")`, `query("pages")` and `header("x-cost")`
//!   name a body field, a query parameter or a request header explicitly;
//! - `min(a, b)`, `max(a, b)`, `ceil(a)`, `floor(a)`.
//!
//! Evaluation is exact decimal arithmetic ([`Decimal`]); a missing or non-numeric
//! field, a query parameter or header given more than once with different values, a
//! division by zero, an overflow or a negative result is a [`EvalError`] that the
//! filter answers with 400 naming the field, never a panic or a free request.

use crate::decimal::{Decimal, DecimalError};

/// Longest expression accepted at load.
pub const MAX_EXPRESSION_LEN: usize = 1024;
/// Deepest nesting accepted at load (parentheses, unary minus, calls).
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Body(Vec<String>),
    Query(String),
    Header(String),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Body(path) => path.join("."),
            Source::Query(name) => format!("query parameter {name}"),
            Source::Header(name) => format!("header {name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Number(Decimal),
    Field(Source),
    Neg(Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Min(Box<Expr>, Box<Expr>),
    Max(Box<Expr>, Box<Expr>),
    Ceil(Box<Expr>),
    Floor(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("is longer than {MAX_EXPRESSION_LEN} characters")]
    TooLong,
    #[error("nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("unexpected {0} at offset {1}")]
    Unexpected(String, usize),
    #[error("unknown function {0:?} (known: body, query, header, min, max, ceil, floor)")]
    UnknownFunction(String),
    #[error("{0}() takes {1} argument(s)")]
    Arity(String, usize),
    #[error("type error: {0}")]
    Type(String),
    #[error("number {0:?} {1}")]
    Number(String, DecimalError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("field `{0}` is missing")]
    Missing(String),
    #[error("field `{0}` is not a number")]
    NotANumber(String),
    #[error("the request body is not a JSON object")]
    BodyNotJson,
    /// Upstreams disagree on which of several values counts (the first, the last,
    /// all of them joined), so `?n=1&n=1000` could be priced for 1 and served for 1000.
    #[error("{0} is given more than once with different values")]
    Ambiguous(String),
    #[error("the price {0}")]
    Arithmetic(DecimalError),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(Decimal),
    Name(String),
    Str(String),
    Op(char),
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, ParseError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'+' | b'-' | b'*' | b'/' => {
                out.push((Token::Op(char::from(c)), start));
                i += 1;
            }
            b'(' => {
                out.push((Token::Open, start));
                i += 1;
            }
            b')' => {
                out.push((Token::Close, start));
                i += 1;
            }
            b',' => {
                out.push((Token::Comma, start));
                i += 1;
            }
            b'"' => {
                let end = text[i + 1..]
                    .find('"')
                    .ok_or_else(|| ParseError::Unexpected("unterminated string".into(), start))?;
                out.push((Token::Str(text[i + 1..i + 1 + end].to_owned()), start));
                i += end + 2;
            }
            b'0'..=b'9' | b'.' => {
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                let literal = &text[start..i];
                let value = Decimal::parse(literal)
                    .map_err(|e| ParseError::Number(literal.to_owned(), e))?;
                out.push((Token::Number(value), start));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'.')
                {
                    i += 1;
                }
                out.push((Token::Name(text[start..i].to_owned()), start));
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                return Err(ParseError::Unexpected(format!("{ch:?}"), start));
            }
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(Token, usize)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(t, _)| t)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(_, o)| *o)
    }

    fn unexpected(&self) -> ParseError {
        let what = match self.peek() {
            None => "end of expression".to_owned(),
            Some(Token::Number(n)) => format!("number {n}"),
            Some(Token::Name(n)) => format!("name {n:?}"),
            Some(Token::Str(s)) => format!("string {s:?}"),
            Some(Token::Op(c)) => format!("operator {c:?}"),
            Some(Token::Open) => "'('".to_owned(),
            Some(Token::Close) => "')'".to_owned(),
            Some(Token::Comma) => "','".to_owned(),
        };
        ParseError::Unexpected(what, self.offset())
    }

    fn expect(&mut self, token: &Token) -> Result<(), ParseError> {
        if self.peek() == Some(token) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    fn sum(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.product(depth)?;
        while let Some(Token::Op(c @ ('+' | '-'))) = self.peek() {
            let op = if *c == '+' { Op::Add } else { Op::Sub };
            self.pos += 1;
            let right = self.product(depth)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn product(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.unary(depth)?;
        while let Some(Token::Op(c @ ('*' | '/'))) = self.peek() {
            let op = if *c == '*' { Op::Mul } else { Op::Div };
            self.pos += 1;
            let right = self.unary(depth)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if depth > MAX_DEPTH {
            return Err(ParseError::TooDeep);
        }
        match self.peek().cloned() {
            Some(Token::Op('-')) => {
                self.pos += 1;
                Ok(Expr::Neg(Box::new(self.unary(depth + 1)?)))
            }
            Some(Token::Number(n)) => {
                self.pos += 1;
                Ok(Expr::Number(n))
            }
            Some(Token::Open) => {
                self.pos += 1;
                let inner = self.sum(depth + 1)?;
                self.expect(&Token::Close)?;
                Ok(inner)
            }
            Some(Token::Name(name)) => {
                self.pos += 1;
                if self.peek() == Some(&Token::Open) {
                    self.pos += 1;
                    self.call(&name, depth + 1)
                } else {
                    Ok(Expr::Field(body_field(&name)?))
                }
            }
            Some(Token::Str(s)) => Err(ParseError::Type(format!(
                "string {s:?} is only allowed as the argument of body(), query() or header()"
            ))),
            _ => Err(self.unexpected()),
        }
    }

    fn call(&mut self, name: &str, depth: usize) -> Result<Expr, ParseError> {
        match name {
            "body" | "query" | "header" => {
                let Some(Token::Str(arg)) = self.peek().cloned() else {
                    return Err(ParseError::Type(format!(
                        "{name}() takes one string literal"
                    )));
                };
                self.pos += 1;
                self.expect(&Token::Close)?;
                if arg.is_empty() || arg.chars().any(char::is_control) {
                    return Err(ParseError::Type(format!("{name}() needs a field name")));
                }
                Ok(Expr::Field(match name {
                    "body" => body_field(&arg)?,
                    "query" => Source::Query(arg),
                    _ => Source::Header(arg.to_ascii_lowercase()),
                }))
            }
            "min" | "max" | "ceil" | "floor" => {
                let mut args = vec![self.sum(depth)?];
                while self.peek() == Some(&Token::Comma) {
                    self.pos += 1;
                    args.push(self.sum(depth)?);
                }
                self.expect(&Token::Close)?;
                let arity = if matches!(name, "min" | "max") { 2 } else { 1 };
                if args.len() != arity {
                    return Err(ParseError::Arity(name.to_owned(), arity));
                }
                let mut args = args.into_iter().map(Box::new);
                let (Some(a), b) = (args.next(), args.next()) else {
                    return Err(ParseError::Arity(name.to_owned(), arity));
                };
                Ok(match (name, b) {
                    ("min", Some(b)) => Expr::Min(a, b),
                    ("max", Some(b)) => Expr::Max(a, b),
                    ("ceil", _) => Expr::Ceil(a),
                    _ => Expr::Floor(a),
                })
            }
            other => Err(ParseError::UnknownFunction(other.to_owned())),
        }
    }
}

fn body_field(path: &str) -> Result<Source, ParseError> {
    let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
    if parts.iter().any(String::is_empty) {
        return Err(ParseError::Type(format!("{path:?} is not a field path")));
    }
    Ok(Source::Body(parts))
}

/// Parses and checks an expression at config load.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    if text.len() > MAX_EXPRESSION_LEN {
        return Err(ParseError::TooLong);
    }
    let mut parser = Parser {
        tokens: tokenize(text)?,
        pos: 0,
        end: text.len(),
    };
    let expr = parser.sum(0)?;
    if parser.pos != parser.tokens.len() {
        return Err(parser.unexpected());
    }
    Ok(expr)
}

/// What an expression reads from the request.
pub struct Inputs<'a> {
    /// The parsed JSON body, when the request had one.
    pub body: Option<&'a serde_json::Value>,
    /// The `:path` with its query string.
    pub path: &'a str,
    /// Request headers the expression names, lower-case; a header the request repeats
    /// is here once per value, so that different values can be refused.
    pub headers: &'a [(String, String)],
}

/// Every value of query parameter `name`, in order (`%XX` and `+` decoded).
pub fn query_values(path: &str, name: &str) -> Vec<String> {
    let Some((_, query)) = path.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
        .collect()
}

/// The value of an input given once, or several times with the same value.
fn single_value(
    values: impl IntoIterator<Item = String>,
    source: &Source,
) -> Result<String, EvalError> {
    let mut values = values.into_iter();
    let first = values
        .next()
        .ok_or_else(|| EvalError::Missing(source.describe()))?;
    if values.any(|v| v != first) {
        return Err(EvalError::Ambiguous(source.describe()));
    }
    Ok(first)
}

/// Form decoding: `+` is a space, `%` and two hex digits a byte; a `%` without two
/// hex digits after it stays as it is (`u8::from_str_radix` would also take `%+5`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes[i] {
            b'%' => bytes.get(i + 1..i + 3).and_then(crate::config::hex_byte),
            _ => None,
        };
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Looks up a dotted path in a JSON value.
pub fn json_path<'v>(
    value: &'v serde_json::Value,
    path: &[String],
) -> Option<&'v serde_json::Value> {
    path.iter().try_fold(value, |v, key| match v {
        serde_json::Value::Object(map) => map.get(key),
        serde_json::Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn field_value(source: &Source, inputs: &Inputs<'_>) -> Result<Decimal, EvalError> {
    let text = match source {
        Source::Body(path) => {
            let body = inputs.body.ok_or(EvalError::BodyNotJson)?;
            match json_path(body, path) {
                None | Some(serde_json::Value::Null) => {
                    return Err(EvalError::Missing(source.describe()))
                }
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(_) => return Err(EvalError::NotANumber(source.describe())),
            }
        }
        Source::Query(name) => single_value(query_values(inputs.path, name), source)?,
        Source::Header(name) => single_value(
            inputs
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone()),
            source,
        )?,
    };
    Decimal::parse(&text).map_err(|_| EvalError::NotANumber(source.describe()))
}

/// Evaluates `expr` exactly.
pub fn eval(expr: &Expr, inputs: &Inputs<'_>) -> Result<Decimal, EvalError> {
    let arith = EvalError::Arithmetic;
    Ok(match expr {
        Expr::Number(n) => *n,
        Expr::Field(source) => field_value(source, inputs)?,
        Expr::Neg(inner) => eval(inner, inputs)?.negated().map_err(arith)?,
        Expr::Binary(op, a, b) => {
            let (a, b) = (eval(a, inputs)?, eval(b, inputs)?);
            match op {
                Op::Add => a.checked_add(&b),
                Op::Sub => a.checked_sub(&b),
                Op::Mul => a.checked_mul(&b),
                Op::Div => a.checked_div(&b),
            }
            .map_err(arith)?
        }
        Expr::Min(a, b) => eval(a, inputs)?.min(eval(b, inputs)?),
        Expr::Max(a, b) => eval(a, inputs)?.max(eval(b, inputs)?),
        Expr::Ceil(a) => eval(a, inputs)?.ceil(),
        Expr::Floor(a) => eval(a, inputs)?.floor(),
    })
}

/// Every request header the expression reads.
pub fn headers_used(expr: &Expr, out: &mut Vec<String>) {
    match expr {
        Expr::Field(Source::Header(name)) => {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        Expr::Number(_) | Expr::Field(_) => {}
        Expr::Neg(a) | Expr::Ceil(a) | Expr::Floor(a) => headers_used(a, out),
        Expr::Binary(_, a, b) | Expr::Min(a, b) | Expr::Max(a, b) => {
            headers_used(a, out);
            headers_used(b, out);
        }
    }
}

/// Whether the expression reads the request body.
pub fn uses_body(expr: &Expr) -> bool {
    match expr {
        Expr::Field(Source::Body(_)) => true,
        Expr::Number(_) | Expr::Field(_) => false,
        Expr::Neg(a) | Expr::Ceil(a) | Expr::Floor(a) => uses_body(a),
        Expr::Binary(_, a, b) | Expr::Min(a, b) | Expr::Max(a, b) => uses_body(a) || uses_body(b),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn run(text: &str, body: serde_json::Value, path: &str) -> Result<String, EvalError> {
        let expr = parse(text).unwrap();
        let headers = vec![("x-upstream-cost".to_owned(), "0.50".to_owned())];
        eval(
            &expr,
            &Inputs {
                body: Some(&body),
                path,
                headers: &headers,
            },
        )
        .map(|d| d.to_string())
    }

    #[test]
    fn computes_the_documented_examples_exactly() {
        let body = serde_json::json!({"width": 1024, "height": 1024, "steps": 50, "audioDuration": 90, "input": {"pages": 12}});
        assert_eq!(
            run("width * height * steps / 1000000", body.clone(), "/").unwrap(),
            "52.4288"
        );
        assert_eq!(
            run("audioDuration / 60 * 0.10", body.clone(), "/").unwrap(),
            "0.15"
        );
        assert_eq!(
            run("input.pages * 0.01", body.clone(), "/").unwrap(),
            "0.12"
        );
        assert_eq!(
            run("query(\"pages\") * 0.01", body.clone(), "/x?pages=7").unwrap(),
            "0.07"
        );
        assert_eq!(
            run("header(\"X-Upstream-Cost\") * 1.2", body.clone(), "/").unwrap(),
            "0.6"
        );
        assert_eq!(
            run("max(ceil(audioDuration / 60), 1) * 0.1", body.clone(), "/").unwrap(),
            "0.2"
        );
        assert_eq!(run("min(2, -(-3)) + floor(2.7)", body, "/").unwrap(), "4");
    }

    #[test]
    fn runtime_errors_name_the_field() {
        let body = serde_json::json!({"pages": "many", "zero": 0});
        assert_eq!(
            run("pages * 2", body.clone(), "/"),
            Err(EvalError::NotANumber("pages".into()))
        );
        assert_eq!(
            run("width * 2", body.clone(), "/"),
            Err(EvalError::Missing("width".into()))
        );
        assert_eq!(
            run("query(\"n\") * 2", body.clone(), "/?m=1"),
            Err(EvalError::Missing("query parameter n".into()))
        );
        assert_eq!(
            run("1 / zero", body.clone(), "/"),
            Err(EvalError::Arithmetic(DecimalError::DivisionByZero))
        );
        assert_eq!(
            run(
                "99999999999999999999 * 99999999999999999999 * 99999999999999999999",
                body,
                "/"
            ),
            Err(EvalError::Arithmetic(DecimalError::Overflow))
        );
    }

    #[test]
    fn load_time_checks() {
        assert!(matches!(parse("foo(1)"), Err(ParseError::UnknownFunction(f)) if f == "foo"));
        assert!(matches!(parse("min(1)"), Err(ParseError::Arity(_, 2))));
        assert!(matches!(parse("\"a\" * 2"), Err(ParseError::Type(_))));
        assert!(matches!(parse("query(pages)"), Err(ParseError::Type(_))));
        assert!(matches!(parse("1 +"), Err(ParseError::Unexpected(_, _))));
        assert!(matches!(parse("(1"), Err(ParseError::Unexpected(_, _))));
        assert!(matches!(parse("1 2"), Err(ParseError::Unexpected(_, _))));
        assert!(matches!(parse("a..b"), Err(ParseError::Type(_))));
        assert!(matches!(parse("1 $ 2"), Err(ParseError::Unexpected(_, _))));
        assert_eq!(parse(&"(".repeat(40)), Err(ParseError::TooDeep));
        assert_eq!(parse(&"1+".repeat(600)), Err(ParseError::TooLong));
        let mut headers = Vec::new();
        headers_used(
            &parse("header(\"X-A\") + header(\"x-a\")").unwrap(),
            &mut headers,
        );
        assert_eq!(headers, vec!["x-a".to_owned()]);
        assert!(!uses_body(&parse("query(\"a\")").unwrap()));
        assert!(uses_body(&parse("a").unwrap()));
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(query_values("/p?a=1&b=%32+", "b"), vec!["2 ".to_owned()]);
        assert_eq!(query_values("/p?a", "a"), vec![String::new()]);
        assert_eq!(query_values("/p?%61=1&a=2", "a"), vec!["1", "2"]);
        assert!(query_values("/p", "a").is_empty());
    }

    #[test]
    fn percent_decoding_takes_a_percent_and_exactly_two_hex_digits() {
        assert_eq!(percent_decode("%32"), "2");
        assert_eq!(percent_decode("1%3"), "1%3");
        assert_eq!(percent_decode("1%"), "1%");
        assert_eq!(percent_decode("%%32"), "%2");
        assert_eq!(percent_decode("%4a%4A"), "JJ");
        assert_eq!(percent_decode("%zz%g1"), "%zz%g1");
        // A sign is not a hex digit, though `u8::from_str_radix` takes one.
        assert_eq!(percent_decode("%+5"), "% 5");
        assert_eq!(percent_decode("%é%1é"), "%é%1é");
        assert_eq!(percent_decode("%C3%A9+%2B"), "é +");
    }

    fn eval_with(text: &str, path: &str, headers: &[(&str, &str)]) -> Result<String, EvalError> {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let inputs = Inputs {
            body: None,
            path,
            headers: &headers,
        };
        eval(&parse(text).unwrap(), &inputs).map(|d| d.to_string())
    }

    #[test]
    fn a_query_parameter_repeated_with_different_values_is_refused() {
        let refused = eval_with("query(\"n\") * 2", "/p?n=1&n=1000", &[]);
        assert_eq!(
            refused,
            Err(EvalError::Ambiguous("query parameter n".into()))
        );
        assert_eq!(
            refused.unwrap_err().to_string(),
            "query parameter n is given more than once with different values"
        );
        // Different only once decoded, or only by a missing value, is still different.
        for path in ["/p?n=1&%6E=2", "/p?n=5&n", "/p?n=1&m=0&n=+1"] {
            assert_eq!(
                eval_with("query(\"n\")", path, &[]),
                Err(EvalError::Ambiguous("query parameter n".into())),
                "{path}"
            );
        }
    }

    #[test]
    fn a_query_parameter_given_once_or_repeated_identically_is_priced() {
        assert_eq!(eval_with("query(\"n\") * 2", "/p?n=3", &[]).unwrap(), "6");
        assert_eq!(
            eval_with("query(\"n\") * 2", "/p?n=3&m=9&n=3", &[]).unwrap(),
            "6"
        );
        // The same value once decoded.
        assert_eq!(
            eval_with("query(\"n\") * 2", "/p?n=3&%6E=%33", &[]).unwrap(),
            "6"
        );
        // Other parameters may repeat as they like.
        assert_eq!(
            eval_with("query(\"n\")", "/p?m=1&n=4&m=2", &[]).unwrap(),
            "4"
        );
    }

    #[test]
    fn a_header_repeated_with_different_values_is_refused() {
        let cost = "header(\"x-cost\") * 2";
        assert_eq!(
            eval_with(
                cost,
                "/",
                &[("x-cost", "1"), ("x-other", "5"), ("X-Cost", "1000")]
            ),
            Err(EvalError::Ambiguous("header x-cost".into()))
        );
        assert_eq!(eval_with(cost, "/", &[("x-cost", "1")]).unwrap(), "2");
        assert_eq!(
            eval_with(cost, "/", &[("x-cost", "1"), ("x-cost", "1")]).unwrap(),
            "2"
        );
        assert_eq!(
            eval_with(cost, "/", &[]),
            Err(EvalError::Missing("header x-cost".into()))
        );
    }
}
