//! The Envoys the 402x filter is compared with, each at `--concurrency 1` on loopback:
//! one without any filter (a bare proxy listener and a `direct_response` listener that
//! answers exactly the bytes of our 402), and one with Envoy's native `ext_authz` gRPC
//! filter in front of the upstream.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use x402_e2e::paths;
use x402_e2e::process::{free_port, ChildGuard, ScratchDir};

pub struct BenchEnvoy {
    pub child: ChildGuard,
    pub admin_port: u16,
    /// Listener ports in the order of the config's listeners.
    pub ports: Vec<u16>,
    _dir: ScratchDir,
}

fn json_str(s: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn cluster(name: &str, port: u16, http2: bool) -> String {
    let h2 = if http2 {
        "      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: { http2_protocol_options: {} }
"
    } else {
        ""
    };
    format!(
        "    - name: {name}
      type: STATIC
      connect_timeout: 1s
{h2}      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"
    )
}

fn listener(name: &str, port: u16, routes: &str, filters: &str) -> String {
    format!(
        "    - name: {name}
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                use_remote_address: true
                # As the shipped configs: the filter and the upstream see the same path.
                normalize_path: true
                merge_slashes: true
                route_config:
                  name: {name}
                  virtual_hosts:
                    - name: all
                      domains: [\"*\"]
                      routes:
{routes}                http_filters:
{filters}                  - name: envoy.filters.http.router
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"
    )
}

const TO_UPSTREAM: &str = "                        - match: { prefix: \"/\" }
                          route: { cluster: upstream }
";

/// Bare proxy on the first listener; on the second, a `direct_response` with `status`,
/// `body` and `headers` (our 402, byte for byte).
pub fn plain_config(
    admin: u16,
    bare: u16,
    direct: u16,
    upstream: u16,
    status: u16,
    body: &str,
    headers: &[(String, String)],
) -> String {
    let mut added = String::new();
    for (name, value) in headers {
        added.push_str(&format!(
            "                            - header: {{ key: {}, value: {} }}\n                              append_action: OVERWRITE_IF_EXISTS_OR_ADD\n",
            json_str(name),
            json_str(value)
        ));
    }
    let direct_routes = format!(
        "                        - match: {{ prefix: \"/\" }}
                          direct_response:
                            status: {status}
                            body: {{ inline_string: {} }}
                          response_headers_to_add:
{added}",
        json_str(body)
    );
    format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:\n{}{}  clusters:\n{}",
        listener("bare", bare, TO_UPSTREAM, ""),
        listener("direct", direct, &direct_routes, ""),
        cluster("upstream", upstream, false)
    )
}

/// Envoy's native ext_authz gRPC filter calling the peer service, then the upstream.
pub fn extauthz_config(admin: u16, listen: u16, upstream: u16, peer: u16) -> String {
    let filter = "                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      failure_mode_allow: false
                      grpc_service:
                        envoy_grpc: { cluster_name: extauthz }
                        timeout: 2s
";
    format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:\n{}  clusters:\n{}{}",
        listener("extauthz", listen, TO_UPSTREAM, filter),
        cluster("upstream", upstream, false),
        cluster("extauthz", peer, true)
    )
}

fn base_id() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    2_000_000 + (std::process::id() % 100_000) * 10 + SEQ.fetch_add(1, Ordering::Relaxed) % 10
}

impl BenchEnvoy {
    /// Starts Envoy with `render(admin_port, listener ports...)` for `listeners` ports.
    pub async fn start(
        label: &str,
        listeners: usize,
        render: impl FnOnce(u16, &[u16]) -> String,
    ) -> Result<BenchEnvoy> {
        let admin_port = free_port()?;
        let ports = (0..listeners)
            .map(|_| free_port())
            .collect::<Result<Vec<_>>>()?;
        let dir = ScratchDir::new(label)?;
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, render(admin_port, &ports))?;
        let log = dir.path().join("envoy.log");
        let mut cmd = Command::new(paths::envoy_bin()?);
        cmd.arg("-c")
            .arg(&config)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .arg("--base-id")
            .arg(base_id().to_string())
            .arg("--log-path")
            .arg(&log);
        let child = ChildGuard::spawn(label, cmd, &log)?;
        let mut envoy = BenchEnvoy {
            child,
            admin_port,
            ports,
            _dir: dir,
        };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if let Some(why) = self.child.exited() {
                bail!("{why}; log:\n{}", self.child.log_tail(40));
            }
            let live = http
                .get(format!("http://127.0.0.1:{}/ready", self.admin_port))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            let mut all = live;
            for port in &self.ports {
                all = all
                    && tokio::net::TcpStream::connect(("127.0.0.1", *port))
                        .await
                        .is_ok();
            }
            if all {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("Envoy not ready in 60 s; log:\n{}", self.child.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// Envoy itself accepts both comparison configs (`--mode validate`).
    fn validates(config: &str) {
        let dir = ScratchDir::new("bench-validate").unwrap();
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let out = Command::new(paths::envoy_bin().unwrap())
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "error",
                "-c",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "envoy refused:\n{config}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn plain_config_with_a_402_direct_response_is_valid() {
        let headers = vec![
            (
                "payment-required".to_string(),
                "eyJ4NDAyVmVyc2lvbiI6Mn0=".to_string(),
            ),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        let body = r#"{"x402Version":2,"error":"payment_required","note":"it's \"quoted\""}"#;
        let config = plain_config(19901, 19902, 19903, 19904, 402, body, &headers);
        assert!(config.contains("status: 402"));
        validates(&config);
    }

    #[test]
    fn ext_authz_config_is_valid() {
        let config = extauthz_config(19911, 19912, 19913, 19914);
        assert!(config.contains("envoy.filters.http.ext_authz"));
        validates(&config);
    }
}
