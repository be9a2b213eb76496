//! The Kubernetes and Istio manifests under `envoy/istio/` are valid resources: the
//! Kubernetes kinds pass `kubernetes-validate --strict` (schemas of the Kubernetes API,
//! unknown fields refused), the Istio kinds pass the schemas generated from Istio's CRD
//! definitions (`@kubernetes-models/istio`, pinned in `tests/manifests/package-lock.json`),
//! and the WasmPlugin's `pluginConfig` compiles with the filter's own config compiler and
//! names the settlement Service's outbound cluster. `make setup` installs both validators.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use x402_e2e::paths::workspace_root;
use x402_filter::config::Config;

fn istio_dir() -> PathBuf {
    workspace_root().join("envoy/istio")
}

fn venv_bin(name: &str) -> PathBuf {
    workspace_root().join(".venv/bin").join(name)
}

/// Every YAML document of `file`, as JSON (PyYAML from the `.venv` that
/// kubernetes-validate brings).
fn load_yaml_documents(file: &Path) -> Vec<Value> {
    let python = venv_bin("python");
    assert!(
        venv_bin("kubernetes-validate").is_file(),
        "kubernetes-validate is not in .venv: run `make setup`"
    );
    let output = Command::new(&python)
        .args([
            "-c",
            "import sys, json, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} is not valid YAML: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn manifests() -> Vec<(PathBuf, Vec<Value>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(istio_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected the manifests under envoy/istio");
    files
        .into_iter()
        .map(|f| {
            let docs = load_yaml_documents(&f);
            (f, docs)
        })
        .collect()
}

fn is_istio(resource: &Value) -> bool {
    resource["apiVersion"]
        .as_str()
        .is_some_and(|v| v.contains(".istio.io/"))
}

/// Runs `kubernetes-validate --strict` on `resources`; Ok(output) or Err(output).
fn validate_kubernetes(resources: &[Value]) -> Result<String, String> {
    let file = std::env::temp_dir().join(format!(
        "x402-manifests-{}-{}.json",
        std::process::id(),
        resources.len()
    ));
    // A YAML stream of JSON documents (JSON is YAML).
    let stream = resources
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n");
    std::fs::write(&file, stream).unwrap();
    let output = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--no-warn"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Installs the pinned Istio schema package once (`npm ci`).
fn istio_validator_dir() -> PathBuf {
    let dir = workspace_root().join("tests/manifests");
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if !dir
        .join("node_modules/@kubernetes-models/istio/package.json")
        .exists()
    {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is not installed: run `make setup`");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
    drop(guard);
    dir
}

/// Runs `validate.mjs` on `resources`; Ok(output) or Err(output).
fn validate_istio(resources: &[Value]) -> Result<String, String> {
    use std::io::Write;
    let dir = istio_validator_dir();
    let mut child = Command::new("node")
        .arg(dir.join("validate.mjs"))
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is not installed: run `make setup`");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(resources).unwrap())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn every_manifest_passes_the_kubernetes_and_istio_schemas() {
    let mut kubernetes = Vec::new();
    let mut istio = Vec::new();
    for (file, docs) in manifests() {
        assert!(!docs.is_empty(), "{} has no resources", file.display());
        for doc in docs {
            if is_istio(&doc) {
                istio.push(doc);
            } else {
                kubernetes.push(doc);
            }
        }
    }
    let kinds = |list: &[Value]| -> Vec<String> {
        list.iter()
            .map(|r| r["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    for kind in ["Deployment", "Service", "Secret"] {
        assert!(kinds(&kubernetes).contains(&kind.to_string()), "no {kind}");
    }
    for kind in ["WasmPlugin", "DestinationRule"] {
        assert!(kinds(&istio).contains(&kind.to_string()), "no {kind}");
    }

    let out = validate_kubernetes(&kubernetes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.matches("passed for resource").count(),
        kubernetes.len(),
        "every Kubernetes resource was checked: {out}"
    );
    let out = validate_istio(&istio).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.matches("VALID ").count() - out.matches("INVALID ").count(),
        istio.len(),
        "{out}"
    );
}

/// The validators are not vacuous: a mistake in each kind is refused.
#[test]
fn the_validators_refuse_broken_resources() {
    let all: Vec<Value> = manifests().into_iter().flat_map(|(_, d)| d).collect();
    let find = |kind: &str| -> Value {
        all.iter()
            .find(|r| r["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind}"))
    };

    let mut deployment = find("Deployment");
    deployment["spec"]["replica"] = json!(2); // typo of `replicas`
    let err = validate_kubernetes(&[deployment]).unwrap_err();
    assert!(err.contains("replica"), "{err}");

    let mut service = find("Service");
    service["spec"]["ports"][0]["port"] = json!("fifty");
    assert!(validate_kubernetes(&[service]).is_err());

    let mut plugin = find("WasmPlugin");
    plugin["spec"]["phase"] = json!("AUTHORIZE");
    let err = validate_istio(&[plugin]).unwrap_err();
    assert!(err.contains("phase"), "{err}");

    let mut plugin = find("WasmPlugin");
    plugin["spec"]["failStrategy"] = json!("FAIL_SOMETIMES");
    let err = validate_istio(&[plugin]).unwrap_err();
    assert!(err.contains("failStrategy"), "{err}");

    let mut rule = find("DestinationRule");
    rule["spec"]["trafficPolicy"]["tls"]["mode"] = json!("MUTUAL_ISTIO");
    assert!(validate_istio(&[rule]).is_err());
}

#[test]
fn the_wasm_plugin_config_compiles_and_names_the_settlement_outbound_cluster() {
    let all: Vec<Value> = manifests().into_iter().flat_map(|(_, d)| d).collect();
    let plugin = all
        .iter()
        .find(|r| r["kind"] == "WasmPlugin")
        .expect("a WasmPlugin");
    let spec = &plugin["spec"];
    assert_eq!(spec["phase"], "AUTHZ");
    assert_eq!(
        spec["failStrategy"], "FAIL_CLOSE",
        "the paywall never opens on failure"
    );
    assert!(spec["selector"]["matchLabels"].is_object());
    assert!(spec["match"][0]["ports"][0]["number"].is_u64());

    let config_json = serde_json::to_vec(&spec["pluginConfig"]).unwrap();
    let config = Config::from_json(&config_json).unwrap_or_else(|e| panic!("pluginConfig: {e}"));
    assert!(config.route_named("quote").is_some());
    assert!(config.route_named("report").is_some());

    // The cluster Istio builds for the settlement Service: outbound|PORT||HOST.
    let service = all
        .iter()
        .find(|r| r["kind"] == "Service" && r["metadata"]["name"] == "settlement")
        .expect("the settlement Service");
    let namespace = service["metadata"]["namespace"].as_str().unwrap();
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["name"], "grpc", "Istio must see gRPC (HTTP/2)");
    let host = format!("settlement.{namespace}.svc.cluster.local");
    assert_eq!(
        config.settlement_cluster,
        format!("outbound|{}||{host}", port["port"])
    );
    let rule = all
        .iter()
        .find(|r| r["kind"] == "DestinationRule")
        .expect("a DestinationRule");
    assert_eq!(rule["spec"]["host"], host.as_str());

    // A bad pluginConfig is refused by the same compiler, naming the field.
    let mut broken = spec["pluginConfig"].clone();
    broken["routes"][0]["price"] = json!("0.1.2");
    let err = Config::from_json(&serde_json::to_vec(&broken).unwrap()).unwrap_err();
    assert!(err.to_string().contains("price"), "{err}");
}

/// One data-plane token, from one Secret, reaches both ends: settlement's
/// `--dataplane-token` (env `X402_DATAPLANE_TOKEN` from the Secret) and the filter's
/// `settlement_token`, whose placeholder the documented apply command replaces with the
/// Secret's value.
#[test]
fn the_dataplane_token_is_wired_from_one_secret_to_settlement_and_the_filter() {
    let all: Vec<Value> = manifests().into_iter().flat_map(|(_, d)| d).collect();
    let deployment = all
        .iter()
        .find(|r| r["kind"] == "Deployment" && r["metadata"]["name"] == "settlement")
        .expect("the settlement Deployment");
    let namespace = deployment["metadata"]["namespace"].as_str().unwrap();
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let token_env = env
        .iter()
        .find(|e| e["name"] == "X402_DATAPLANE_TOKEN")
        .expect("settlement gets X402_DATAPLANE_TOKEN (--dataplane-token)");
    let secret_ref = &token_env["valueFrom"]["secretKeyRef"];
    let (secret_name, key) = (
        secret_ref["name"].as_str().unwrap(),
        secret_ref["key"].as_str().unwrap(),
    );
    let secret = all
        .iter()
        .find(|r| {
            r["kind"] == "Secret"
                && r["metadata"]["name"] == secret_name
                && r["metadata"]["namespace"] == namespace
        })
        .unwrap_or_else(|| panic!("the Secret {namespace}/{secret_name}"));
    let placeholder = secret["stringData"][key].as_str().unwrap();

    let plugin = all
        .iter()
        .find(|r| r["kind"] == "WasmPlugin")
        .expect("a WasmPlugin");
    let plugin_config = &plugin["spec"]["pluginConfig"];
    assert_eq!(plugin_config["settlement_token"], placeholder);
    // The apply command in the WasmPlugin's header reads that Secret and key and
    // replaces that placeholder.
    let text = std::fs::read_to_string(istio_dir().join("wasmplugin.yaml")).unwrap();
    assert!(
        text.contains(&format!("get secret {secret_name}")),
        "{text}"
    );
    assert!(text.contains(&format!("{{.data.{key}}}")), "{text}");
    assert!(text.contains(&format!("s/{placeholder}/$TOKEN/")), "{text}");

    // With a generated token filled in, the filter sends it to settlement.
    let token = "6f1c0e0a9b8d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e";
    let filled = text.replace(placeholder, token);
    assert!(!filled.contains(placeholder));
    let mut config_json = plugin_config.clone();
    config_json["settlement_token"] = json!(token);
    let config = Config::from_json(&serde_json::to_vec(&config_json).unwrap()).unwrap();
    assert_eq!(config.settlement_token.map(|t| t.0).as_deref(), Some(token));
}
