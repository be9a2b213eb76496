//! The root fields of a GraphQL operation, for pricing per field (`Query.user`,
//! `Mutation.createPost`). Only the lexical structure the root selection set needs is
//! read: strings, comments, names and balanced brackets; arguments and sub-selections
//! are skipped. Root fragment spreads are refused, so a price cannot be dodged by
//! hiding fields in a fragment.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphQlError {
    #[error("the request body has no GraphQL `query` string")]
    NoQuery,
    #[error("the GraphQL document is malformed: {0}")]
    Syntax(&'static str),
    #[error("the GraphQL document has no operation named {0:?}")]
    UnknownOperation(String),
    #[error("the GraphQL document has several operations; set operationName")]
    AmbiguousOperation,
    #[error("fragments in the root selection set are not priced; select root fields directly")]
    RootFragment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    Name(&'a str),
    Punct(u8),
    Spread,
    Str,
}

fn lex(doc: &str) -> Result<Vec<Tok<'_>>, GraphQlError> {
    let b = doc.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => i += 1,
            0xEF if b[i..].starts_with(&[0xEF, 0xBB, 0xBF]) => i += 3,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' if b[i..].starts_with(b"\"\"\"") => {
                i += 3;
                loop {
                    // `\"""` is the one escape in a block string; ending at it would
                    // hide what follows from pricing while the server still runs it.
                    match b.get(i..) {
                        None | Some([]) => {
                            return Err(GraphQlError::Syntax("unterminated block string"))
                        }
                        Some(rest) if rest.starts_with(b"\\\"\"\"") => i += 4,
                        Some(rest) if rest.starts_with(b"\"\"\"") => break,
                        Some(_) => i += 1,
                    }
                }
                i += 3;
                out.push(Tok::Str);
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some(b'\n') => {
                            return Err(GraphQlError::Syntax("unterminated string"))
                        }
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
                out.push(Tok::Str);
            }
            b'.' if b[i..].starts_with(b"...") => {
                out.push(Tok::Spread);
                i += 3;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Tok::Name(&doc[start..i]));
            }
            c if c.is_ascii_digit() || c == b'-' || c == b'.' => {
                // Number literals only appear inside arguments, which are skipped.
                i += 1;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'.'
                        || b[i] == b'+'
                        || b[i] == b'-')
                {
                    i += 1;
                }
                out.push(Tok::Str);
            }
            c @ (b'{' | b'}' | b'(' | b')' | b'[' | b']' | b':' | b'@' | b'$' | b'!' | b'='
            | b'|' | b'&') => {
                out.push(Tok::Punct(c));
                i += 1;
            }
            _ => return Err(GraphQlError::Syntax("unexpected character")),
        }
    }
    Ok(out)
}

/// Skips a balanced `open ... close` group starting at `toks[i] == open`.
fn skip_group(toks: &[Tok<'_>], mut i: usize, open: u8, close: u8) -> Result<usize, GraphQlError> {
    let mut depth = 0usize;
    while let Some(t) = toks.get(i) {
        if *t == Tok::Punct(open) {
            depth += 1;
        } else if *t == Tok::Punct(close) {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                return Ok(i + 1);
            }
        }
        i += 1;
    }
    Err(GraphQlError::Syntax("unbalanced brackets"))
}

struct Operation<'a> {
    root_type: &'static str,
    name: Option<&'a str>,
    /// Index of the opening `{` of the selection set.
    selection: usize,
}

fn operations<'a>(toks: &[Tok<'a>]) -> Result<Vec<Operation<'a>>, GraphQlError> {
    let mut ops = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (root_type, mut j) = match toks[i] {
            Tok::Punct(b'{') => ("Query", i),
            Tok::Name("query") => ("Query", i + 1),
            Tok::Name("mutation") => ("Mutation", i + 1),
            Tok::Name("subscription") => ("Subscription", i + 1),
            Tok::Name("fragment") => {
                // fragment Name on Type [directives] { ... }
                let open = toks[i..]
                    .iter()
                    .position(|t| *t == Tok::Punct(b'{'))
                    .ok_or(GraphQlError::Syntax("fragment without selection set"))?;
                i = skip_group(toks, i + open, b'{', b'}')?;
                continue;
            }
            _ => return Err(GraphQlError::Syntax("expected an operation")),
        };
        let mut name = None;
        if j != i {
            if let Some(Tok::Name(n)) = toks.get(j) {
                name = Some(*n);
                j += 1;
            }
            if toks.get(j) == Some(&Tok::Punct(b'(')) {
                j = skip_group(toks, j, b'(', b')')?;
            }
            while toks.get(j) == Some(&Tok::Punct(b'@')) {
                j += 2;
                if toks.get(j) == Some(&Tok::Punct(b'(')) {
                    j = skip_group(toks, j, b'(', b')')?;
                }
            }
        }
        if toks.get(j) != Some(&Tok::Punct(b'{')) {
            return Err(GraphQlError::Syntax("operation without selection set"));
        }
        ops.push(Operation {
            root_type,
            name,
            selection: j,
        });
        i = skip_group(toks, j, b'{', b'}')?;
    }
    Ok(ops)
}

/// `Type.field` for each root field of the chosen operation, in document order
/// (a field selected twice under two aliases counts twice).
pub fn root_fields(body: &serde_json::Value) -> Result<Vec<String>, GraphQlError> {
    let query = body
        .get("query")
        .and_then(serde_json::Value::as_str)
        .ok_or(GraphQlError::NoQuery)?;
    let operation_name = body
        .get("operationName")
        .and_then(serde_json::Value::as_str);
    let toks = lex(query)?;
    let ops = operations(&toks)?;
    let op = match operation_name {
        Some(wanted) => ops
            .iter()
            .find(|o| o.name == Some(wanted))
            .ok_or_else(|| GraphQlError::UnknownOperation(wanted.to_owned()))?,
        None => match ops.as_slice() {
            [only] => only,
            [] => return Err(GraphQlError::Syntax("no operation")),
            _ => return Err(GraphQlError::AmbiguousOperation),
        },
    };
    let mut fields = Vec::new();
    let mut i = op.selection + 1;
    loop {
        match toks.get(i) {
            Some(Tok::Punct(b'}')) => break,
            Some(Tok::Spread) => return Err(GraphQlError::RootFragment),
            Some(Tok::Name(first)) => {
                let mut field = *first;
                i += 1;
                if toks.get(i) == Some(&Tok::Punct(b':')) {
                    match toks.get(i + 1) {
                        Some(Tok::Name(real)) => field = real,
                        _ => return Err(GraphQlError::Syntax("alias without field")),
                    }
                    i += 2;
                }
                if toks.get(i) == Some(&Tok::Punct(b'(')) {
                    i = skip_group(&toks, i, b'(', b')')?;
                }
                while toks.get(i) == Some(&Tok::Punct(b'@')) {
                    i += 2;
                    if toks.get(i) == Some(&Tok::Punct(b'(')) {
                        i = skip_group(&toks, i, b'(', b')')?;
                    }
                }
                if toks.get(i) == Some(&Tok::Punct(b'{')) {
                    i = skip_group(&toks, i, b'{', b'}')?;
                }
                fields.push(format!("{}.{field}", op.root_type));
            }
            _ => return Err(GraphQlError::Syntax("expected a field")),
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn fields(query: &str) -> Result<Vec<String>, GraphQlError> {
        root_fields(&serde_json::json!({ "query": query }))
    }

    #[test]
    fn finds_root_fields_past_arguments_aliases_and_selections() {
        let q = r#"
            # a comment with { braces
            query Feed($id: ID!) {
              me: user(id: $id, filter: {name: "a}b", tags: ["x"]}) @include(if: true) { id posts { id } }
              posts(first: 10) { id }
              __typename
            }"#;
        assert_eq!(
            fields(q).unwrap(),
            ["Query.user", "Query.posts", "Query.__typename"]
        );
        assert_eq!(fields("{ user { id } }").unwrap(), ["Query.user"]);
        assert_eq!(
            fields("mutation { createPost(title: \"\"\"hi\"\"\") { id } a: createPost { id } }")
                .unwrap(),
            ["Mutation.createPost", "Mutation.createPost"]
        );
    }

    #[test]
    fn picks_the_named_operation_and_skips_fragments() {
        let body = serde_json::json!({
            "query": "fragment F on User { id } query A { user { ...F } } mutation B { createPost { id } }",
            "operationName": "B"
        });
        assert_eq!(root_fields(&body).unwrap(), ["Mutation.createPost"]);
        let mut ambiguous = body.clone();
        ambiguous.as_object_mut().unwrap().remove("operationName");
        assert_eq!(
            root_fields(&ambiguous),
            Err(GraphQlError::AmbiguousOperation)
        );
        let mut unknown = body;
        unknown["operationName"] = "C".into();
        assert!(matches!(
            root_fields(&unknown),
            Err(GraphQlError::UnknownOperation(_))
        ));
    }

    #[test]
    fn an_escaped_triple_quote_does_not_end_a_block_string() {
        // `\"""` is part of the block string (spec: BlockStringCharacter), so the
        // string ends at the second `"""` and `expensive` is a root field, not comment.
        let q = concat!(r#"{ cheap(a: """\""" """) expensive # """)"#, "\n}");
        assert_eq!(fields(q).unwrap(), ["Query.cheap", "Query.expensive"]);
        // A backslash before the escape is an ordinary character.
        assert_eq!(
            fields(r#"{ a(s: """x\\""" """) b }"#).unwrap(),
            ["Query.a", "Query.b"]
        );
        assert!(matches!(
            fields(r#"{ a(s: """\""") }"#),
            Err(GraphQlError::Syntax(_))
        ));
    }

    #[test]
    fn refuses_what_it_cannot_price() {
        assert_eq!(fields("{ ...F }"), Err(GraphQlError::RootFragment));
        assert_eq!(
            fields("{ ... on Query { user } }"),
            Err(GraphQlError::RootFragment)
        );
        assert!(matches!(fields("{ user "), Err(GraphQlError::Syntax(_))));
        assert!(matches!(
            fields("{ user(id: \"x) }"),
            Err(GraphQlError::Syntax(_))
        ));
        assert_eq!(
            root_fields(&serde_json::json!({"q": 1})),
            Err(GraphQlError::NoQuery)
        );
    }
}
