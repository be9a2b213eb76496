//! Bearer-token checks for the gRPC services and the HTTP endpoints.
//!
//! The operator API and the data-plane API each take an optional token; when it is
//! set, a call without `authorization: Bearer <token>` is UNAUTHENTICATED. Tokens are
//! compared in constant time and never logged.

use std::sync::Arc;

use tonic::{Request, Status};

/// An optional expected token; `None` lets every call through (development).
#[derive(Clone, Default)]
pub struct BearerToken(Option<Arc<str>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(if self.0.is_some() {
            "BearerToken(set)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl BearerToken {
    pub fn new(token: Option<String>) -> Self {
        BearerToken(token.filter(|t| !t.is_empty()).map(Arc::from))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// True when `header` (the whole `authorization` value) carries the token, or
    /// when no token is required.
    pub fn accepts(&self, header: Option<&str>) -> bool {
        let Some(expected) = &self.0 else {
            return true;
        };
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        constant_time_eq(given.trim().as_bytes(), expected.as_bytes())
    }

    /// A tonic interceptor enforcing the token.
    pub fn interceptor(&self) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
        let token = self.clone();
        move |request: Request<()>| {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if token.accepts(header) {
                Ok(request)
            } else {
                Err(Status::unauthenticated("missing or wrong bearer token"))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_required_only_when_set() {
        let none = BearerToken::new(None);
        assert!(none.accepts(None));
        let t = BearerToken::new(Some("s3cret".into()));
        assert!(t.accepts(Some("Bearer s3cret")));
        assert!(!t.accepts(Some("Bearer s3cre")));
        assert!(!t.accepts(Some("s3cret")));
        assert!(!t.accepts(None));
        assert_eq!(format!("{t:?}"), "BearerToken(set)");
    }
}
