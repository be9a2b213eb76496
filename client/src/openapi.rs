//! An OpenAPI 3.1 document of what a 402x gateway charges, generated from the filter's
//! own plugin configuration: it is parsed and compiled by `x402-filter`, routes are
//! matched with the filter's matcher, and the advertised terms come from the same
//! function that writes its 402 challenges, so the document cannot drift from what
//! the gateway enforces.
//!
//! Without an upstream document, each priced route becomes a path (a prefix route is
//! documented at its prefix). With one (`merge`), every operation of the upstream
//! document that a priced route matches gets the 402 response, the payment headers
//! and the `x-402` extension; priced routes no operation matched are added.

use serde_json::{json, Map, Value};
use thiserror::Error;
use x402_filter::config::{Config, ConfigError, PathMatch, Route, RouteKey};
use x402_filter::discovery::{self, DiscoveryItem};

/// Methods a route without a method constraint is documented under.
const ANY_METHOD: [&str; 5] = ["get", "post", "put", "patch", "delete"];
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[derive(Debug, Error)]
pub enum OpenApiError {
    #[error("filter configuration refused: {0}")]
    Config(#[from] ConfigError),
    #[error("the upstream OpenAPI document is not usable: {0}")]
    Upstream(String),
}

/// The document for `filter_config` (the plugin JSON), optionally merged into
/// `upstream` (an OpenAPI 3.x document as JSON). `server` becomes the `servers` entry.
pub fn generate(
    filter_config: &[u8],
    upstream: Option<Value>,
    server: Option<&str>,
) -> Result<Value, OpenApiError> {
    let config = Config::from_json(filter_config)?;
    // Server-relative resources: the scheme and authority come from `servers`.
    let listing = discovery::document(&config, "http", "gateway");
    let mut doc = match upstream {
        Some(doc) => {
            if !doc.is_object() {
                return Err(OpenApiError::Upstream("not a JSON object".into()));
            }
            doc
        }
        None => json!({
            "info": {
                "title": "402x priced API",
                "version": "1.0.0",
                "description": "Routes priced by the 402x gateway. Unpaid requests are answered 402 with an x402 v2 challenge; pay by sending the PAYMENT-SIGNATURE header."
            },
            "paths": {}
        }),
    };
    set(&mut doc, "openapi", json!("3.1.0"));
    if let Some(server) = server {
        set(&mut doc, "servers", json!([{ "url": server }]));
    }
    let mut used = vec![false; config.routes.len()];
    annotate_upstream(&config, &listing.items, &mut doc, &mut used);
    for (index, (route, item)) in config.routes.iter().zip(&listing.items).enumerate() {
        if used[index] {
            continue;
        }
        let Some(path) = documented_path(route) else {
            continue;
        };
        let methods: Vec<String> = match &route.matcher.method {
            Some(m) => vec![m.to_ascii_lowercase()],
            None => ANY_METHOD.iter().map(|m| (*m).to_owned()).collect(),
        };
        let path_item = entry(&mut doc, "paths").and_then(|paths| {
            if !paths.contains_key(&path) {
                paths.insert(path.clone(), json!({}));
            }
            paths.get_mut(&path).and_then(Value::as_object_mut)
        });
        let Some(path_item) = path_item else {
            continue;
        };
        for method in methods {
            let mut op = json!({
                "operationId": operation_id(&route.name, &method),
                "summary": if route.description.is_empty() { route.name.clone() } else { route.description.clone() },
                "responses": { "200": { "description": "The upstream's answer, paid." } }
            });
            if let PathMatch::Prefix(prefix) = &route.matcher.path {
                op["description"] = json!(format!(
                    "Priced for every path that starts with `{prefix}`."
                ));
            }
            price_operation(&mut op, route, item);
            path_item.insert(method, op);
        }
    }
    // Routes matched by Envoy route name only have no path to document them under.
    let unplaced: Vec<Value> = config
        .routes
        .iter()
        .zip(&listing.items)
        .filter(|(route, _)| documented_path(route).is_none())
        .map(|(route, item)| json!({ "route": route.name, "routeName": route.matcher.route_name, "accepts": item.accepts, "price": route.price_decimal }))
        .collect();
    if !unplaced.is_empty() {
        set(&mut doc, "x-402-envoy-routes", Value::Array(unplaced));
    }
    if let Some(components) = entry(&mut doc, "components") {
        if !components.contains_key("schemas") {
            components.insert("schemas".into(), json!({}));
        }
        if let Some(schemas) = components.get_mut("schemas").and_then(Value::as_object_mut) {
            for (name, schema) in schemas_of_the_protocol() {
                schemas.insert(name.to_owned(), schema);
            }
        }
    }
    Ok(doc)
}

fn set(doc: &mut Value, key: &str, value: Value) {
    if let Some(object) = doc.as_object_mut() {
        object.insert(key.to_owned(), value);
    }
}

/// The object at `doc[key]`, created when missing.
fn entry<'a>(doc: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    let object = doc.as_object_mut()?;
    if !object.get(key).is_some_and(Value::is_object) {
        object.insert(key.to_owned(), json!({}));
    }
    object.get_mut(key).and_then(Value::as_object_mut)
}

fn documented_path(route: &Route) -> Option<String> {
    if route.matcher.route_name.is_some() {
        // Also needs an Envoy route name, which an OpenAPI path cannot express.
        return None;
    }
    match &route.matcher.path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => Some(p.clone()),
        PathMatch::Any => Some("/".to_owned()),
    }
}

fn operation_id(route: &str, method: &str) -> String {
    let clean: String = route
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{clean}_{method}")
}

/// Marks the upstream's operations that a route (without an Envoy route name) prices.
fn annotate_upstream(config: &Config, items: &[DiscoveryItem], doc: &mut Value, used: &mut [bool]) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item_map) = item.as_object_mut() else {
            continue;
        };
        for method in METHODS {
            let Some(op) = item_map.get_mut(method) else {
                continue;
            };
            let key = RouteKey {
                route_name: None,
                method,
                path,
            };
            let Some(index) = config.routes.iter().position(|r| r.matcher.matches(&key)) else {
                continue;
            };
            if let (Some(route), Some(listing)) = (config.routes.get(index), items.get(index)) {
                price_operation(op, route, listing);
                if let Some(flag) = used.get_mut(index) {
                    *flag = true;
                }
            }
        }
    }
}

/// Adds the payment header parameter, the 402/400/503 answers, the receipt header on
/// success and the `x-402` extension to one operation.
fn price_operation(op: &mut Value, route: &Route, item: &DiscoveryItem) {
    let Some(op) = op.as_object_mut() else {
        return;
    };
    let accepts: Vec<Value> = item
        .accepts
        .iter()
        .map(|a| serde_json::to_value(a).unwrap_or(Value::Null))
        .collect();
    let first = item.accepts.first();
    op.insert(
        "x-402".into(),
        json!({
            "route": route.name,
            "price": route.price_decimal,
            "amount": first.map(|a| a.amount.clone()),
            "scheme": first.map(|a| a.scheme.clone()),
            "asset": first.map(|a| a.asset.clone()),
            "network": first.map(|a| a.network.clone()),
            "payTo": first.map(|a| a.pay_to.clone()),
            "maxTimeoutSeconds": first.map(|a| a.max_timeout_seconds),
            "accepts": accepts,
        }),
    );
    if !op.get("parameters").is_some_and(Value::is_array) {
        op.insert("parameters".into(), json!([]));
    }
    if let Some(parameters) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        let has = parameters.iter().any(|p| {
            p.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case("PAYMENT-SIGNATURE"))
        });
        if !has {
            parameters.push(json!({
                "name": "PAYMENT-SIGNATURE",
                "in": "header",
                "required": false,
                "description": "Base64 of the JSON x402 v2 PaymentPayload (alias X-402-Payment). Without it the answer is 402.",
                "schema": { "type": "string", "contentEncoding": "base64", "contentMediaType": "application/json", "contentSchema": { "$ref": "#/components/schemas/PaymentPayload" } }
            }));
        }
    }
    if !op.get("responses").is_some_and(Value::is_object) {
        op.insert("responses".into(), json!({}));
    }
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for (code, response) in responses.iter_mut() {
        if code.starts_with('2') {
            if let Some(response) = response.as_object_mut() {
                if !response.get("headers").is_some_and(Value::is_object) {
                    response.insert("headers".into(), json!({}));
                }
                if let Some(headers) = response.get_mut("headers").and_then(Value::as_object_mut) {
                    headers.insert("PAYMENT-RESPONSE".into(), json!({
                        "description": "Base64 of the JSON x402 v2 SettleResponse: the receipt of the payment.",
                        "schema": { "type": "string", "contentEncoding": "base64", "contentMediaType": "application/json", "contentSchema": { "$ref": "#/components/schemas/SettleResponse" } }
                    }));
                }
            }
        }
    }
    let price = match first {
        Some(a) => format!(
            "{} {} ({} atomic units, scheme {})",
            route.price_decimal, a.asset, a.amount, a.scheme
        ),
        None => route.price_decimal.clone(),
    };
    responses.insert("402".into(), json!({
        "description": format!("Payment required: {price}. Also the answer to a refused proof, with `error` saying why."),
        "headers": {
            "PAYMENT-REQUIRED": {
                "description": "Base64 of the JSON x402 v2 PaymentRequired challenge (the same JSON as the body).",
                "required": true,
                "schema": { "type": "string", "contentEncoding": "base64", "contentMediaType": "application/json", "contentSchema": { "$ref": "#/components/schemas/PaymentRequired" } }
            }
        },
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/PaymentRequired" } } }
    }));
    responses.entry("400").or_insert_with(|| json!({
        "description": "The payment header is malformed (`malformed_payment`).",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/X402Error" } } }
    }));
    responses.entry("503").or_insert_with(|| json!({
        "description": "Settlement is unreachable and the route fails closed (`settlement_unavailable`).",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/X402Error" } } }
    }));
}

fn schemas_of_the_protocol() -> Vec<(&'static str, Value)> {
    let atomic = json!({ "type": "string", "pattern": "^(0|[1-9][0-9]*)$", "description": "Atomic units of the asset." });
    vec![
        (
            "PaymentRequirements",
            json!({
                "type": "object",
                "required": ["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds"],
                "properties": {
                    "scheme": { "type": "string", "description": "`exact` (fixed price) or `upto` (metered maximum)." },
                    "network": { "type": "string" },
                    "amount": atomic,
                    "asset": { "type": "string" },
                    "payTo": { "type": "string" },
                    "maxTimeoutSeconds": { "type": "integer", "minimum": 1 },
                    "extra": { "type": "object" }
                }
            }),
        ),
        (
            "PaymentRequired",
            json!({
                "type": "object",
                "required": ["x402Version", "resource", "accepts"],
                "properties": {
                    "x402Version": { "const": 2 },
                    "error": { "type": "string" },
                    "resource": {
                        "type": "object",
                        "required": ["url"],
                        "properties": { "url": { "type": "string" }, "description": { "type": "string" }, "mimeType": { "type": "string" } }
                    },
                    "accepts": { "type": "array", "items": { "$ref": "#/components/schemas/PaymentRequirements" } },
                    "price": { "type": "string" },
                    "paymentAddress": { "type": "string" }
                }
            }),
        ),
        (
            "PaymentPayload",
            json!({
                "type": "object",
                "required": ["x402Version", "accepted", "payload"],
                "properties": {
                    "x402Version": { "const": 2 },
                    "accepted": { "$ref": "#/components/schemas/PaymentRequirements" },
                    "payload": {
                        "type": "object",
                        "required": ["payer", "nonce", "validBefore", "resource", "signature"],
                        "properties": {
                            "payer": { "type": "string", "pattern": "^[0-9a-f]{64}$" },
                            "nonce": { "type": "string", "pattern": "^[0-9a-f]{32,128}$" },
                            "validBefore": { "type": "string" },
                            "resource": { "type": "string" },
                            "signature": { "type": "string", "pattern": "^[0-9a-f]{128}$" }
                        }
                    }
                }
            }),
        ),
        (
            "SettleResponse",
            json!({
                "type": "object",
                "required": ["success", "transaction", "network", "payer", "amount"],
                "properties": {
                    "success": { "type": "boolean" },
                    "transaction": { "type": "string" },
                    "network": { "type": "string" },
                    "payer": { "type": "string" },
                    "amount": atomic,
                    "errorReason": { "type": "string" }
                }
            }),
        ),
        (
            "X402Error",
            json!({
                "type": "object",
                "required": ["error", "message"],
                "properties": { "error": { "type": "string" }, "message": { "type": "string" } }
            }),
        ),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"settlement_cluster":"s","pay_to":"merchant-demo","routes":[
        {"name":"report","match":{"method":"POST","path_exact":"/paid/report"},"price":"0.25","description":"A report"},
        {"name":"quote","match":{"path_prefix":"/paid"},"price":"0.01"},
        {"name":"named","match":{"route_name":"r1"},"price":"2"}]}"#;

    #[test]
    fn every_priced_route_is_documented_with_its_price() {
        let doc = generate(CONFIG.as_bytes(), None, Some("http://127.0.0.1:10000")).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let report = &doc["paths"]["/paid/report"]["post"];
        assert_eq!(report["x-402"]["amount"], "250000");
        assert_eq!(report["x-402"]["price"], "0.25");
        assert_eq!(report["x-402"]["payTo"], "merchant-demo");
        assert!(report["responses"]["402"]["headers"]["PAYMENT-REQUIRED"].is_object());
        assert!(report["responses"]["200"]["headers"]["PAYMENT-RESPONSE"].is_object());
        assert!(doc["paths"]["/paid/report"].get("get").is_none());
        for method in ANY_METHOD {
            assert_eq!(doc["paths"]["/paid"][method]["x-402"]["amount"], "10000");
        }
        assert_eq!(doc["x-402-envoy-routes"][0]["route"], "named");
        assert!(doc["components"]["schemas"]["PaymentRequired"].is_object());
    }

    #[test]
    fn merging_prices_the_upstream_operations_the_filter_matches() {
        let upstream = json!({
            "openapi": "3.1.0",
            "info": {"title": "Quotes", "version": "2"},
            "paths": {
                "/paid/quote/{sym}": {"get": {"operationId": "quote", "responses": {"200": {"description": "ok"}}}},
                "/paid/report": {"post": {"operationId": "report", "responses": {"201": {"description": "made"}}}},
                "/free": {"get": {"operationId": "free", "responses": {"200": {"description": "ok"}}}}
            }
        });
        let doc = generate(CONFIG.as_bytes(), Some(upstream), None).unwrap();
        assert_eq!(doc["info"]["title"], "Quotes");
        let quote = &doc["paths"]["/paid/quote/{sym}"]["get"];
        assert_eq!(quote["operationId"], "quote");
        assert_eq!(quote["x-402"]["route"], "quote");
        let report = &doc["paths"]["/paid/report"]["post"];
        assert_eq!(report["x-402"]["route"], "report");
        assert!(report["responses"]["201"]["headers"]["PAYMENT-RESPONSE"].is_object());
        assert!(doc["paths"]["/free"]["get"].get("x-402").is_none());
        assert!(doc["paths"]["/free"]["get"]["responses"]
            .get("402")
            .is_none());
        // Both path routes matched an operation, so no extra paths were invented.
        assert!(doc["paths"].get("/paid").is_none());
    }

    #[test]
    fn a_refused_config_is_an_error_naming_the_field() {
        let err = generate(br#"{"settlement_cluster":"s","routes":[]}"#, None, None).unwrap_err();
        assert!(err.to_string().contains("pay_to"), "{err}");
    }
}
