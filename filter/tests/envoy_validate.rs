//! Runs `envoy --mode validate` on every shipped Envoy config. Validation loads the
//! wasm module and runs the filter's `on_configure`, so it proves the module loads in
//! Envoy's V8 and that a bad plugin JSON is refused at load with the field named.
//!
//! Needs the built filter (`X402_FILTER_WASM`, default
//! `<target>/wasm32-wasip1/wasm/x402_filter.wasm`) and Envoy (`X402_ENVOY`, default
//! `<workspace>/.venv/bin/envoy`); `make test` provides both.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_fixture, workspace_dir, INVALID, VALID};

const VALIDATE_TIMEOUT: Duration = Duration::from_secs(120);

fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("X402_FILTER_WASM") {
        return PathBuf::from(p);
    }
    let relative = "wasm32-wasip1/wasm/x402_filter.wasm";
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let p = PathBuf::from(dir).join(relative);
        if p.exists() {
            return p;
        }
    }
    workspace_dir().join("target").join(relative)
}

fn envoy_path() -> PathBuf {
    std::env::var_os("X402_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join(".venv/bin/envoy"))
}

/// Both prerequisites, or a failure that says how to get them: never a silent skip.
fn prerequisites() -> (PathBuf, PathBuf) {
    let (wasm, envoy) = (wasm_path(), envoy_path());
    assert!(
        wasm.is_file(),
        "filter wasm not found at {} (set X402_FILTER_WASM): run `make test`, which builds it first",
        wasm.display()
    );
    assert!(
        envoy.is_file(),
        "envoy not found at {} (set X402_ENVOY): run `make test`, which installs it",
        envoy.display()
    );
    (wasm, envoy)
}

/// Fills the template's placeholders the way the dev stack does.
fn render_template(wasm: &Path, filter_config: &str) -> String {
    let template =
        std::fs::read_to_string(workspace_dir().join("envoy/envoy.template.yaml")).unwrap();
    let rendered = template
        .replace("${LISTEN_PORT}", "10000")
        .replace("${ADMIN_PORT}", "9901")
        .replace("${UPSTREAM_PORT}", "8080")
        .replace("${GRPC_UPSTREAM_PORT}", "8081")
        .replace("${SETTLEMENT_PORT}", "50051")
        .replace("${WASM_PATH}", &wasm.display().to_string())
        .replace(
            "${FILTER_CONFIG}",
            &filter_config.replace('\n', " ").replace('\'', "''"),
        );
    assert!(
        !rendered.contains("${"),
        "a placeholder is left in the template"
    );
    rendered
}

/// Runs `envoy --mode validate` on `yaml`; returns success and the combined output.
fn validate(envoy: &Path, name: &str, yaml: &str) -> (bool, String) {
    let file =
        std::env::temp_dir().join(format!("x402-validate-{}-{name}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let out_file = file.with_extension("log");
    let log = std::fs::File::create(&out_file).unwrap();
    let mut child = Command::new(envoy)
        .args(["--mode", "validate", "--concurrency", "1", "-c"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", envoy.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > VALIDATE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("envoy --mode validate on {name} did not finish in {VALIDATE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&out_file);
    (status.success(), output)
}

#[test]
fn the_template_validates_with_the_demo_and_every_valid_config() {
    let (wasm, envoy) = prerequisites();
    let demo = std::fs::read_to_string(workspace_dir().join("envoy/demo-filter.json")).unwrap();
    let mut configs = vec![("demo".to_owned(), demo)];
    configs.extend(
        VALID
            .iter()
            .map(|n| ((*n).to_owned(), read_fixture("valid", n))),
    );
    for (name, json) in configs {
        let (ok, output) = validate(&envoy, &name, &render_template(&wasm, &json));
        assert!(ok, "template with {name} config must validate:\n{output}");
        assert!(
            output.contains("x402 filter: configured"),
            "{name}: the filter's on_configure did not run:\n{output}"
        );
    }
}

#[test]
fn the_standalone_example_validates() {
    let (wasm, envoy) = prerequisites();
    let example =
        std::fs::read_to_string(workspace_dir().join("envoy/example/envoy.yaml")).unwrap();
    assert!(example.contains("/etc/envoy/x402_filter.wasm"));
    let yaml = example.replace("/etc/envoy/x402_filter.wasm", &wasm.display().to_string());
    let (ok, output) = validate(&envoy, "example", &yaml);
    assert!(ok, "envoy/example/envoy.yaml must validate:\n{output}");
    assert!(output.contains("configured 2 priced route(s)"), "{output}");
}

#[test]
fn every_invalid_config_is_refused_at_load_naming_the_field() {
    let (wasm, envoy) = prerequisites();
    for (name, field) in INVALID {
        let (ok, output) = validate(
            &envoy,
            name,
            &render_template(&wasm, &read_fixture("invalid", name)),
        );
        assert!(!ok, "{name} must fail validation:\n{output}");
        assert!(
            output.contains("rejected configuration"),
            "{name}: refused for another reason:\n{output}"
        );
        assert!(
            output.contains(field),
            "{name}: Envoy's output does not name `{field}`:\n{output}"
        );
    }
}
