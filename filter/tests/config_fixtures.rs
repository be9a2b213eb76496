//! Every invalid configuration fixture is refused with an error naming its field;
//! every valid one compiles.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{read_fixture, INVALID, VALID};
use x402_filter::config::Config;

fn refused(name: &str) {
    let field = INVALID
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("{name} is not in the table"));
    let err = Config::from_json(read_fixture("invalid", name).as_bytes()).expect_err(name);
    assert!(
        err.to_string().contains(field),
        "{name}: error {err:?} does not name `{field}`"
    );
}

macro_rules! invalid_fixture_tests {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { refused(stringify!($name)); } )*

        #[test]
        fn every_invalid_fixture_has_a_test() {
            let tested = [$(stringify!($name)),*];
            let dir = common::crate_dir().join("tests/fixtures/invalid");
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                assert!(tested.contains(&stem.as_str()), "fixture {stem} has no test");
            }
            assert_eq!(tested.len(), INVALID.len());
        }
    };
}

invalid_fixture_tests!(
    unknown_field,
    unknown_match_field,
    price_too_precise,
    price_negative,
    price_not_a_number,
    missing_settlement_cluster,
    missing_pay_to,
    empty_pay_to,
    duplicate_route_name,
    route_without_match,
    route_with_two_paths,
    grpc_method_leading_slash,
    grpc_method_with_path,
    grpc_void_codes_ok,
    capture_below_status_zero,
    capture_window_too_long,
    discovery_path_relative,
    rate_limit_zero_requests,
    rate_limit_unknown_field,
    free_tier_bad_per,
    global_limit_zero_requests,
    global_limit_bad_key,
    global_limit_with_free_tier,
    free_tier_zero_window,
    allow_pseudo_header,
    allow_metadata_empty_path,
    failure_mode_unknown,
    timeout_ms_zero,
    pricing_unknown_model,
    pricing_zero_max_units,
    pricing_message_unknown_direction,
    pricing_negative_unit_price,
    pricing_unit_price_rounds_to_zero,
    pricing_max_amount_too_large,
    pricing_bad_usage_header,
    pricing_relative_json_pointer,
    pricing_relative_items_pointer,
    pricing_expression_unknown_function,
    pricing_expression_type_error,
    pricing_expression_syntax_error,
    pricing_graphql_bad_field,
    pricing_graphql_nothing_priced,
    pricing_time_window_empty,
    pricing_time_window_past_midnight,
    pricing_time_windows_overlap,
    pricing_price_with_meter,
    pricing_missing_price,
    validate_rule_without_check,
    validate_bad_field_path,
    validate_empty_allowed,
    request_body_limit_zero,
    pricing_volume_tiers_not_ascending,
    debug_crash_header_uppercase,
);

#[test]
fn valid_fixtures_compile() {
    for name in VALID {
        let c = Config::from_json(read_fixture("valid", name).as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(c.pay_to, "merchant-demo", "{name}");
    }
    let full = Config::from_json(read_fixture("valid", "full").as_bytes()).unwrap();
    assert!(full.verify_signatures_in_filter);
    assert_eq!(
        full.routes.iter().map(|r| r.price).collect::<Vec<_>>(),
        vec![10_000, 20_000, 1_000_000]
    );
}

#[test]
fn shipped_demo_config_compiles_with_report_before_quote() {
    let demo = std::fs::read(common::workspace_dir().join("envoy/demo-filter.json")).unwrap();
    let c = Config::from_json(&demo).unwrap();
    let names: Vec<_> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["report", "quote"]);
    assert_eq!(c.route_named("report").unwrap().price, 250_000);
    assert_eq!(c.route_named("quote").unwrap().price, 10_000);
}

/// A route's challenge template, filled with a URL, is byte for byte the challenge
/// built and serialized whole, for every route of every valid fixture and URLs that
/// need escaping.
#[test]
fn challenge_templates_render_the_challenge_exactly() {
    use x402_filter::request::{quoted_challenge, static_quote, ChallengeInput};
    use x402_proto::wire::ErrorCode;
    let mut rendered = 0;
    for name in VALID {
        let config = Config::from_json(read_fixture("valid", name).as_bytes()).unwrap();
        for route in &config.routes {
            let template = route
                .challenge_template
                .as_ref()
                .unwrap_or_else(|| panic!("{name}/{}: no template", route.name));
            for (authority, path) in [
                ("127.0.0.1:10000", "/paid/quote?sym=ABC"),
                ("api.example.com", "/a\"b\\c/\u{e9}t\u{e9}?q=<1>&x=\u{1}"),
                ("", ""),
            ] {
                let input = ChallengeInput {
                    scheme: "https".into(),
                    authority: authority.into(),
                    path: path.into(),
                    free_remaining: None,
                };
                let whole = serde_json::to_vec(&quoted_challenge(
                    &config,
                    route,
                    &input,
                    &static_quote(route),
                    ErrorCode::PaymentRequired,
                ))
                .unwrap();
                let url = format!("https://{authority}{path}");
                assert_eq!(
                    String::from_utf8(template.render(&url)).unwrap(),
                    String::from_utf8(whole).unwrap(),
                    "{name}/{}",
                    route.name
                );
                rendered += 1;
            }
        }
    }
    assert!(rendered > 20, "only {rendered} challenges compared");
}
