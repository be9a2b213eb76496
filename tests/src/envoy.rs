//! The real Envoy with the 402x filter: `envoy/envoy.template.yaml` rendered with this
//! run's ports, the wasm path and the plugin JSON, then `envoy` started with
//! `--disable-hot-restart` and a unique `--base-id` (so parallel tests never share
//! shared-memory names), its log in a scratch dir, killed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::pki::CertFiles;
use crate::process::{free_port, ChildGuard, ScratchDir};

/// V8 compiles the module at start; on a slow machine this takes a while.
const READY_LIMIT: Duration = Duration::from_secs(90);

/// What a rendered config needs besides the template.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Downstream listener port (`${LISTEN_PORT}`); 0 picks a free one.
    pub listen_port: u16,
    /// Admin port (`${ADMIN_PORT}`); 0 picks a free one.
    pub admin_port: u16,
    pub upstream_port: u16,
    /// The HTTP/2 gRPC upstream (`${GRPC_UPSTREAM_PORT}`); the HTTP upstream's port
    /// when the test has none (no gRPC call is then made).
    pub grpc_upstream_port: Option<u16>,
    pub settlement_port: u16,
    /// The plugin configuration JSON (`${FILTER_CONFIG}`).
    pub filter_config: String,
    /// Envoy worker threads (`--concurrency`).
    pub concurrency: u32,
    /// `-l` log level.
    pub log_level: String,
    /// HTTP filters (JSON objects, as in Envoy's `http_filters`) placed before x402,
    /// e.g. `jwt_authn` to put verified JWT claims in dynamic metadata.
    pub filters_before_x402: Vec<serde_json::Value>,
    /// Serve the listener through LDS from a watched file, as a control plane would,
    /// so [`Envoy::reconfigure`] can replace it (new filter configuration) while Envoy
    /// runs. Listeners replaced this way drain for `--drain-time-s 1`.
    pub listener_from_file: bool,
    /// The x402 filter's `allow_on_headers_stop_iteration` (on in the template); off
    /// shows what an Envoy without it (or an Istio `WasmPlugin`) does.
    pub headers_stop_iteration: bool,
    /// The `settlement` cluster speaks TLS to settlement: trusting `ca` and presenting
    /// `client` (mutual TLS), the server checked to be `localhost`.
    pub settlement_tls: Option<(PathBuf, CertFiles)>,
}

impl EnvoyOptions {
    pub fn new(upstream_port: u16, settlement_port: u16, filter_config: &str) -> EnvoyOptions {
        EnvoyOptions {
            listen_port: 0,
            admin_port: 0,
            upstream_port,
            grpc_upstream_port: None,
            settlement_port,
            filter_config: filter_config.to_string(),
            concurrency: 1,
            log_level: std::env::var("X402_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            filters_before_x402: Vec::new(),
            listener_from_file: false,
            headers_stop_iteration: true,
            settlement_tls: None,
        }
    }
}

/// Replaces the template's placeholders. The filter JSON goes inside a YAML
/// single-quoted scalar, where a `'` is written `''`.
pub fn render_template(
    template: &str,
    listen_port: u16,
    admin_port: u16,
    upstream_port: u16,
    settlement_port: u16,
    wasm_path: &Path,
    filter_config: &str,
) -> Result<String> {
    let filter_json: serde_json::Value =
        serde_json::from_str(filter_config).context("the filter config is not valid JSON")?;
    // Compact, one line: the scalar must not break across YAML lines.
    let filter_json = serde_json::to_string(&filter_json)?.replace('\'', "''");
    let rendered = template
        .replace("${LISTEN_PORT}", &listen_port.to_string())
        .replace("${ADMIN_PORT}", &admin_port.to_string())
        .replace("${UPSTREAM_PORT}", &upstream_port.to_string())
        .replace("${SETTLEMENT_PORT}", &settlement_port.to_string())
        .replace("${WASM_PATH}", &wasm_path.display().to_string())
        .replace("${FILTER_CONFIG}", &filter_json);
    if let Some(at) = rendered.find("${") {
        let rest: String = rendered[at..].chars().take(40).collect();
        bail!("the Envoy template has an unknown placeholder: {rest}");
    }
    Ok(rendered)
}

/// Puts `filters` (one YAML flow mapping each, i.e. JSON) where the template marks
/// the place before the x402 filter.
fn insert_filters_before_x402(config: &str, filters: &[serde_json::Value]) -> Result<String> {
    const MARKER: &str = "# x402-pre-filters";
    if filters.is_empty() {
        return Ok(config.to_owned());
    }
    let Some(line) = config.lines().find(|l| l.trim_start().starts_with(MARKER)) else {
        bail!("the Envoy template has no `{MARKER}` line");
    };
    let indent = &line[..line.len() - line.trim_start().len()];
    let mut entries = Vec::with_capacity(filters.len());
    for filter in filters {
        entries.push(format!("{indent}- {}", serde_json::to_string(filter)?));
    }
    Ok(config.replacen(line, &entries.join("\n"), 1))
}

/// The template rendered for `options`, whose ports are chosen already.
fn render(options: &EnvoyOptions) -> Result<String> {
    let wasm = paths::filter_wasm()?;
    let template_path = paths::envoy_template()?;
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?
        .replace(
            "${GRPC_UPSTREAM_PORT}",
            &options
                .grpc_upstream_port
                .unwrap_or(options.upstream_port)
                .to_string(),
        );
    let config = render_template(
        &template,
        options.listen_port,
        options.admin_port,
        options.upstream_port,
        options.settlement_port,
        &wasm,
        &options.filter_config,
    )?;
    let config = if options.headers_stop_iteration {
        config
    } else {
        const ON: &str = "allow_on_headers_stop_iteration: true";
        if !config.contains(ON) {
            bail!("the Envoy template does not set `{ON}`");
        }
        config.replace(ON, "allow_on_headers_stop_iteration: false")
    };
    let config = match &options.settlement_tls {
        Some((ca, client)) => settlement_over_tls(&config, ca, client)?,
        None => config,
    };
    insert_filters_before_x402(&config, &options.filters_before_x402)
}

/// Gives the template's `settlement` cluster an upstream TLS transport socket.
fn settlement_over_tls(config: &str, ca: &Path, client: &CertFiles) -> Result<String> {
    const CLUSTER: &str = "    - name: settlement\n      type: STATIC\n";
    if !config.contains(CLUSTER) {
        bail!("the Envoy template has no `settlement` cluster of type STATIC");
    }
    let socket = format!(
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{ filename: "{}" }}
                private_key: {{ filename: "{}" }}
            validation_context:
              trusted_ca: {{ filename: "{}" }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: localhost }}
"#,
        client.cert.display(),
        client.key.display(),
        ca.display()
    );
    Ok(config.replacen(CLUSTER, &format!("{CLUSTER}{socket}"), 1))
}

/// Splits a rendered config into a bootstrap that reads its listeners from
/// `listeners_path` (LDS over a watched file) and that file's contents: the template's
/// `static_resources.listeners` entries, as the resources of a discovery response.
fn split_listeners(config: &str, listeners_path: &Path) -> Result<(String, String)> {
    const LISTENERS: &str = "\n  listeners:\n";
    const CLUSTERS: &str = "\n  clusters:\n";
    const FIRST: &str = "    - name: ";
    let (Some(start), Some(end)) = (config.find(LISTENERS), config.find(CLUSTERS)) else {
        bail!(
            "the Envoy template has no `listeners:` followed by `clusters:` under static_resources"
        );
    };
    let block = config
        .get(start + LISTENERS.len()..end)
        .context("the listeners come after the clusters in the Envoy template")?;
    if !block.starts_with(FIRST) {
        bail!("the Envoy template's first listener does not start with `{FIRST}`");
    }
    // The same list items, each a typed resource.
    let mut listeners = String::from("resources:\n");
    for line in block.lines() {
        match line.strip_prefix(FIRST) {
            Some(name) => listeners.push_str(&format!(
                "    - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n      name: {name}\n"
            )),
            None => {
                listeners.push_str(line);
                listeners.push('\n');
            }
        }
    }
    let path = serde_json::to_string(&listeners_path.display().to_string())?;
    let bootstrap = format!(
        "{}\n{}\nnode: {{ id: x402-test, cluster: x402-test }}\n\
         dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    \
         path_config_source: {{ path: {path} }}\n",
        &config[..start],
        &config[end..].trim_start_matches('\n'),
    );
    Ok((bootstrap, listeners))
}

/// Writes `contents` to `path` the way Envoy's file watch expects: a new file renamed
/// over the old one.
fn replace_file(path: &Path, contents: &str) -> Result<()> {
    let staged = path.with_extension("next");
    std::fs::write(&staged, contents).with_context(|| format!("writing {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("renaming onto {}", path.display()))
}

fn unique_base_id() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    // Distinct per process and per instance; Envoy multiplies it internally, keep it small.
    (std::process::id() % 100_000) * 10 + SEQ.fetch_add(1, Ordering::Relaxed) % 10 + 1_000_000
}

pub struct Envoy {
    child: ChildGuard,
    config_path: PathBuf,
    /// The LDS file when `options.listener_from_file`.
    listeners_path: PathBuf,
    /// What the running config was rendered from (ports filled in).
    options: EnvoyOptions,
    /// Holds the rendered config and the log.
    _dir: ScratchDir,
}

impl Envoy {
    /// Renders the template and starts Envoy; returns once the admin `/ready` says LIVE
    /// and the listener accepts connections.
    pub async fn start(options: EnvoyOptions) -> Result<Envoy> {
        // A port that was free when picked can be taken by a parallel test before Envoy
        // binds it; with ports of our own choosing, pick again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(&options).await {
                Err(e)
                    if attempt < 3
                        && options.listen_port == 0
                        && options.admin_port == 0
                        && e.to_string().contains("Address already in use") => {}
                other => return other,
            }
        }
    }

    async fn start_once(options: &EnvoyOptions) -> Result<Envoy> {
        let envoy = paths::envoy_bin()?;
        let mut options = options.clone();
        if options.listen_port == 0 {
            options.listen_port = free_port()?;
        }
        if options.admin_port == 0 {
            options.admin_port = free_port()?;
        }
        let config = render(&options)?;
        let dir = ScratchDir::new("envoy")?;
        let config_path = dir.path().join("envoy.yaml");
        let listeners_path = dir.path().join("listeners.yaml");
        let log = dir.path().join("envoy.log");
        let mut cmd = Command::new(&envoy);
        if options.listener_from_file {
            let (bootstrap, listeners) = split_listeners(&config, &listeners_path)?;
            std::fs::write(&listeners_path, listeners)?;
            std::fs::write(&config_path, bootstrap)?;
            cmd.arg("--drain-time-s").arg("1");
        } else {
            std::fs::write(&config_path, config)?;
        }
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--concurrency")
            .arg(options.concurrency.to_string())
            .arg("--disable-hot-restart")
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("-l")
            .arg(&options.log_level)
            .arg("--log-path")
            .arg(&log);
        let child = ChildGuard::spawn("envoy", cmd, &log)?;
        let mut envoy = Envoy {
            child,
            config_path,
            listeners_path,
            options,
            _dir: dir,
        };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    /// Replaces the listener with one whose x402 filter has `filter_config`, as a
    /// control plane pushing new prices would (LDS; needs `listener_from_file`), and
    /// returns once Envoy has taken the update. Requests already in progress finish on
    /// the old listener, which then drains.
    pub async fn reconfigure(&mut self, filter_config: &str) -> Result<()> {
        if !self.options.listener_from_file {
            bail!("reconfigure needs an Envoy started with listener_from_file");
        }
        let mut options = self.options.clone();
        options.filter_config = filter_config.to_owned();
        let (_, listeners) = split_listeners(&render(&options)?, &self.listeners_path)?;
        let before = self.counter("listener_manager.lds.update_success").await?;
        replace_file(&self.listeners_path, &listeners)?;
        let start = Instant::now();
        loop {
            let rejected = self.counter("listener_manager.lds.update_rejected").await?;
            if rejected > 0 {
                bail!(
                    "Envoy rejected the new listener; log:\n{}",
                    self.log_tail(40)
                );
            }
            if self.counter("listener_manager.lds.update_success").await? > before {
                break;
            }
            if start.elapsed() > READY_LIMIT {
                bail!(
                    "Envoy did not take the new listener within {READY_LIMIT:?}; log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.options = options;
        self.wait_ready().await
    }

    /// A counter or gauge from the admin `/stats` endpoint (0 when Envoy has none yet).
    pub async fn counter(&self, name: &str) -> Result<u64> {
        let url = format!(
            "http://127.0.0.1:{}/stats?format=json&filter={name}",
            self.options.admin_port
        );
        let body: serde_json::Value = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?
            .get(&url)
            .send()
            .await?
            .json()
            .await?;
        let value = body["stats"]
            .as_array()
            .and_then(|stats| stats.iter().find(|s| s["name"] == name))
            .and_then(|s| s["value"].as_u64());
        Ok(value.unwrap_or(0))
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        let ready_url = format!("http://127.0.0.1:{}/ready", self.options.admin_port);
        let start = Instant::now();
        loop {
            if let Some(why) = self.child.exited() {
                bail!(
                    "{why} before it was ready; log:\n{}",
                    self.child.log_tail(60)
                );
            }
            let live = match client.get(&ready_url).send().await {
                Ok(response) => response.status().is_success(),
                Err(_) => false,
            };
            if live
                && tokio::net::TcpStream::connect(("127.0.0.1", self.options.listen_port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if start.elapsed() > READY_LIMIT {
                bail!(
                    "Envoy was not ready within {READY_LIMIT:?}; log:\n{}",
                    self.child.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn listen_port(&self) -> u16 {
        self.options.listen_port
    }

    pub fn admin_port(&self) -> u16 {
        self.options.admin_port
    }

    /// `127.0.0.1:PORT`, the authority clients send (and sign).
    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.options.listen_port)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        self.child.log_path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.child.log_tail(lines)
    }

    /// Waits up to `limit` until Envoy's log contains `needle` (Envoy writes its log
    /// file every few seconds, not line by line).
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if log.contains(needle) {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("Envoy did not log `{needle}` within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `None` while running, else how it ended.
    pub fn exited(&mut self) -> Option<String> {
        self.child.exited()
    }

    /// Stops Envoy (SIGTERM, then SIGKILL after `grace`).
    pub fn shutdown(mut self, grace: Duration) {
        self.child.terminate(grace);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn rendering_fills_every_placeholder_and_escapes_quotes() {
        let template = "port: ${LISTEN_PORT}/${ADMIN_PORT}/${UPSTREAM_PORT}/${SETTLEMENT_PORT}\nwasm: ${WASM_PATH}\ncfg: '${FILTER_CONFIG}'\n";
        let out = render_template(
            template,
            1,
            2,
            3,
            4,
            Path::new("/x/f.wasm"),
            r#"{"description": "it's"}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            "port: 1/2/3/4\nwasm: /x/f.wasm\ncfg: '{\"description\":\"it''s\"}'\n"
        );
    }

    #[test]
    fn listeners_split_off_into_a_discovery_file_keep_every_line() {
        let config = "admin: {}\n\nstatic_resources:\n  listeners:\n    - name: a\n      port: 1\n    - name: b\n      filters:\n        - name: f\n\n  clusters:\n    - name: c\n";
        let (bootstrap, listeners) = split_listeners(config, Path::new("/d/l.yaml")).unwrap();
        assert_eq!(
            listeners,
            "resources:\n\
             \x20   - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n      name: a\n      port: 1\n\
             \x20   - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n      name: b\n      filters:\n        - name: f\n"
        );
        assert_eq!(
            bootstrap,
            "admin: {}\n\nstatic_resources:\n  clusters:\n    - name: c\n\n\
             node: { id: x402-test, cluster: x402-test }\n\
             dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    \
             path_config_source: { path: \"/d/l.yaml\" }\n"
        );
        assert!(split_listeners("static_resources:\n  clusters:\n", Path::new("/l")).is_err());
    }

    #[test]
    fn rendering_refuses_unknown_placeholders_and_bad_json() {
        assert!(render_template("${NOPE}", 1, 2, 3, 4, Path::new("/f"), "{}").is_err());
        assert!(render_template("x", 1, 2, 3, 4, Path::new("/f"), "{not json").is_err());
    }
}
