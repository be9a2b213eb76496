//! Shared by the integration tests: the fixture table and paths.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

/// Every invalid fixture and the field its error must name.
pub const INVALID: &[(&str, &str)] = &[
    ("unknown_field", "settlment_timeout_ms"),
    ("unknown_match_field", "patth_prefix"),
    ("price_too_precise", "routes[0].price"),
    ("price_negative", "routes[0].price"),
    ("price_not_a_number", "routes[0].price"),
    ("missing_settlement_cluster", "settlement_cluster"),
    ("missing_pay_to", "pay_to"),
    ("empty_pay_to", "pay_to"),
    ("duplicate_route_name", "routes[1].name"),
    ("route_without_match", "routes[0].match"),
    ("route_with_two_paths", "routes[0].match"),
    ("grpc_method_leading_slash", "routes[0].match.grpc_method"),
    ("grpc_method_with_path", "routes[0].match.grpc_method"),
    ("grpc_void_codes_ok", "grpc_void_codes"),
    ("capture_below_status_zero", "capture_below_status"),
    ("capture_window_too_long", "capture_window_ms"),
    ("discovery_path_relative", "discovery_path"),
    (
        "rate_limit_zero_requests",
        "routes[0].rate_limit.max_requests",
    ),
    ("rate_limit_unknown_field", "max_request"),
    ("free_tier_bad_per", "routes[0].free_tier.per"),
    (
        "global_limit_zero_requests",
        "routes[0].global_limit.max_requests",
    ),
    ("global_limit_bad_key", "routes[0].global_limit.key"),
    ("global_limit_with_free_tier", "routes[0].global_limit"),
    (
        "free_tier_zero_window",
        "routes[0].free_tier.window_seconds",
    ),
    ("allow_pseudo_header", "routes[0].allow.headers[0].name"),
    (
        "allow_metadata_empty_path",
        "routes[0].allow.metadata[0].path",
    ),
    ("failure_mode_unknown", "routes[0].failure_mode"),
    ("timeout_ms_zero", "routes[0].timeout_ms"),
    ("pricing_unknown_model", "per_minute"),
    ("pricing_message_unknown_direction", "sideways"),
    (
        "pricing_zero_max_units",
        "routes[0].pricing.per_second.max_units",
    ),
    (
        "pricing_negative_unit_price",
        "routes[0].pricing.per_kb.unit_price",
    ),
    (
        "pricing_unit_price_rounds_to_zero",
        "routes[0].pricing.per_token.unit_price",
    ),
    (
        "pricing_max_amount_too_large",
        "routes[0].pricing.per_token.max_units",
    ),
    (
        "pricing_bad_usage_header",
        "routes[0].pricing.per_token.tokens_from.header",
    ),
    (
        "pricing_relative_json_pointer",
        "routes[0].pricing.per_token.tokens_from.json_pointer",
    ),
    (
        "pricing_relative_items_pointer",
        "routes[0].pricing.per_item.items_pointer",
    ),
    (
        "pricing_expression_unknown_function",
        "routes[0].pricing.expression.expr",
    ),
    (
        "pricing_expression_type_error",
        "routes[0].pricing.expression.expr",
    ),
    (
        "pricing_expression_syntax_error",
        "routes[0].pricing.expression.expr",
    ),
    (
        "pricing_graphql_bad_field",
        "routes[0].pricing.graphql.fields[\"user\"]",
    ),
    (
        "pricing_graphql_nothing_priced",
        "routes[0].pricing.graphql.fields",
    ),
    (
        "pricing_time_window_empty",
        "routes[0].pricing.time_of_day.windows[0]",
    ),
    (
        "pricing_time_window_past_midnight",
        "routes[0].pricing.time_of_day.windows[0]",
    ),
    (
        "pricing_time_windows_overlap",
        "routes[0].pricing.time_of_day.windows[1]",
    ),
    ("pricing_price_with_meter", "routes[0].price"),
    ("pricing_missing_price", "routes[0].price"),
    ("validate_rule_without_check", "routes[0].validate[0]"),
    ("validate_bad_field_path", "routes[0].validate[0].field"),
    ("validate_empty_allowed", "routes[0].validate[0].allowed"),
    (
        "request_body_limit_zero",
        "routes[0].max_request_body_bytes",
    ),
    (
        "pricing_volume_tiers_not_ascending",
        "routes[0].pricing.volume.tiers[1].from_requests",
    ),
    ("debug_crash_header_uppercase", "debug_crash_on_header"),
];

pub const VALID: &[&str] = &[
    "minimal",
    "no_routes",
    "full",
    "policy",
    "pricing",
    "streaming",
    "grpc",
];

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn workspace_dir() -> PathBuf {
    crate_dir()
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(crate_dir)
}

pub fn fixture(kind: &str, name: &str) -> PathBuf {
    crate_dir()
        .join("tests/fixtures")
        .join(kind)
        .join(format!("{name}.json"))
}

pub fn read_fixture(kind: &str, name: &str) -> String {
    let path = fixture(kind, name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
