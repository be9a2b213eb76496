//! Discovery: `GET <discovery_path>` (e.g. `/.well-known/x402`) answers with the list of
//! priced routes, in the shape of an x402 Bazaar discovery listing, so clients and
//! catalogues can find what this gateway sells without paying first.
//!
//! Off unless the configuration sets `discovery_path`. Every item's `accepts` is built by
//! the same function that writes the 402 challenges ([`request::challenge`]), so what is
//! advertised is exactly what a request to that route is asked to pay.

use serde::Serialize;
use x402_proto::wire::{ErrorCode, PaymentRequirements};

use crate::config::{Config, PathMatch, Route};
use crate::request::{self, ChallengeInput, Effect, RequestInfo};

/// The discovery document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Discovery {
    pub x402_version: u32,
    pub items: Vec<DiscoveryItem>,
}

/// One priced route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryItem {
    /// URL of the route on the host discovery was asked on (the prefix for prefix routes;
    /// empty path for routes matched by Envoy route name only).
    pub resource: String,
    /// Always `http`: these are HTTP resources.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub x402_version: u32,
    /// What a request to this route is asked to pay, as in its 402 challenge.
    pub accepts: Vec<PaymentRequirements>,
    pub metadata: ItemMetadata,
}

/// How the route is matched and priced, in the operator's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemMetadata {
    /// The route's `name` in the plugin configuration.
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Upper-case method, when the route matches one method only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_name: Option<String>,
    /// The price as a decimal of the asset, e.g. `"0.01"`.
    pub price: String,
    pub asset: String,
    pub asset_decimals: u8,
}

/// The discovery document for requests that arrived as `scheme://authority`.
pub fn document(config: &Config, scheme: &str, authority: &str) -> Discovery {
    Discovery {
        x402_version: x402_proto::X402_VERSION,
        items: config
            .routes
            .iter()
            .map(|route| item(config, route, scheme, authority))
            .collect(),
    }
}

fn item(config: &Config, route: &Route, scheme: &str, authority: &str) -> DiscoveryItem {
    let (path_exact, path_prefix, path) = match &route.matcher.path {
        PathMatch::Exact(p) => (Some(p.clone()), None, p.clone()),
        PathMatch::Prefix(p) => (None, Some(p.clone()), p.clone()),
        PathMatch::Any => (None, None, String::new()),
    };
    let input = ChallengeInput {
        scheme: scheme.to_owned(),
        authority: authority.to_owned(),
        path,
        free_remaining: None,
    };
    let challenge = request::challenge(config, route, &input, ErrorCode::PaymentRequired);
    DiscoveryItem {
        resource: challenge.resource.url,
        kind: "http",
        x402_version: challenge.x402_version,
        accepts: challenge.accepts,
        metadata: ItemMetadata {
            name: route.name.clone(),
            description: route.description.clone(),
            method: route.matcher.method.clone(),
            path_exact,
            path_prefix,
            route_name: route.matcher.route_name.clone(),
            price: route.price_decimal.clone(),
            asset: config.asset.clone(),
            asset_decimals: config.asset_decimals,
        },
    }
}

/// The local reply to a discovery request, or `None` when discovery is off or this
/// request is not one (other method or path). Only `GET` and `HEAD` are answered; the
/// query string is ignored.
pub fn reply(config: &Config, info: &RequestInfo) -> Option<Effect> {
    let wanted = config.discovery_path.as_deref()?;
    let path = info.path.split(['?', '#']).next().unwrap_or_default();
    let method = info.method.to_ascii_uppercase();
    if path != wanted || !(method == "GET" || method == "HEAD") {
        return None;
    }
    let scheme = if info.scheme.is_empty() {
        "http"
    } else {
        info.scheme.as_str()
    };
    let doc = document(config, scheme, &info.authority);
    let body = if method == "HEAD" {
        Vec::new()
    } else {
        serde_json::to_vec(&doc).unwrap_or_default()
    };
    Some(Effect::Reply {
        status: 200,
        headers: vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("cache-control".to_owned(), "max-age=60".to_owned()),
        ],
        body,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn config(discovery: Option<&str>) -> Config {
        let mut json = serde_json::json!({
            "settlement_cluster": "s", "pay_to": "merchant-demo",
            "routes": [
                {"name": "report", "match": {"method": "post", "path_exact": "/paid/report"}, "price": "0.25", "description": "A report"},
                {"name": "quote", "match": {"path_prefix": "/paid"}, "price": "0.01"},
                {"name": "named", "match": {"route_name": "r1"}, "price": "2"}
            ]
        });
        if let Some(path) = discovery {
            json["discovery_path"] = serde_json::Value::from(path);
        }
        Config::from_json(json.to_string().as_bytes()).unwrap()
    }

    fn info(method: &str, path: &str) -> RequestInfo {
        RequestInfo {
            scheme: "http".into(),
            method: method.into(),
            authority: "api.example.com:8080".into(),
            path: path.into(),
            ..RequestInfo::default()
        }
    }

    #[test]
    fn off_by_default() {
        assert_eq!(config(None).discovery_path, None);
        assert_eq!(
            reply(&config(None), &info("GET", "/.well-known/x402")),
            None
        );
    }

    #[test]
    fn lists_every_route_with_its_challenge_terms() {
        let c = config(Some("/.well-known/x402"));
        let Some(Effect::Reply {
            status,
            headers,
            body,
        }) = reply(&c, &info("GET", "/.well-known/x402?x=1"))
        else {
            panic!("no reply");
        };
        assert_eq!(status, 200);
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["x402Version"], 2);
        let items = doc["items"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[0]["resource"],
            "http://api.example.com:8080/paid/report"
        );
        assert_eq!(items[0]["type"], "http");
        assert_eq!(items[0]["metadata"]["method"], "POST");
        assert_eq!(items[0]["metadata"]["pathExact"], "/paid/report");
        assert_eq!(items[0]["metadata"]["price"], "0.25");
        assert_eq!(items[0]["metadata"]["description"], "A report");
        assert_eq!(items[0]["accepts"][0]["amount"], "250000");
        assert_eq!(items[0]["accepts"][0]["payTo"], "merchant-demo");
        assert_eq!(items[0]["accepts"][0]["asset"], "USD");
        assert_eq!(items[1]["metadata"]["pathPrefix"], "/paid");
        assert_eq!(items[1]["accepts"][0]["amount"], "10000");
        assert_eq!(items[2]["metadata"]["routeName"], "r1");
        assert_eq!(items[2]["accepts"][0]["amount"], "2000000");

        // The advertised terms are the route's challenge, field for field.
        let route = c.route_named("quote").unwrap();
        let input = ChallengeInput {
            scheme: "http".into(),
            authority: "api.example.com:8080".into(),
            path: "/paid".into(),
            free_remaining: None,
        };
        let challenge = request::challenge(&c, route, &input, ErrorCode::PaymentRequired);
        assert_eq!(
            serde_json::to_value(&challenge.accepts).unwrap(),
            items[1]["accepts"]
        );
    }

    #[test]
    fn only_get_and_head_on_the_exact_path() {
        let c = config(Some("/.well-known/x402"));
        assert_eq!(reply(&c, &info("POST", "/.well-known/x402")), None);
        assert_eq!(reply(&c, &info("GET", "/.well-known/x402/more")), None);
        assert_eq!(reply(&c, &info("GET", "/paid")), None);
        let Some(Effect::Reply { status, body, .. }) =
            reply(&c, &info("head", "/.well-known/x402"))
        else {
            panic!("no reply");
        };
        assert_eq!((status, body.len()), (200, 0));
    }
}
