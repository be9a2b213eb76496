//! The real settlement service: the `x402-settlement` binary started with `serve` on a
//! free loopback port, its Operator gRPC API (for seeding accounts, keys and credit) and
//! its operator CLI (for the CLI smoke test).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use x402_proto::settlement::v1::operator_client::OperatorClient;
use x402_proto::settlement::v1::{
    AccountKind, AddKeyRequest, Balance, CreateAccountRequest, DepositRequest, GetAccountRequest,
    GetBalanceRequest, GetPaymentRequest, ListPaymentsRequest, Payment, RevokeKeyRequest,
};

use crate::paths;
use crate::pki::{CertFiles, TestPki};
use crate::process::{free_port, ChildGuard, ScratchDir};

/// How long the service may take to accept gRPC after start (it runs migrations first).
const READY_LIMIT: Duration = Duration::from_secs(60);

pub struct Settlement {
    /// The running `serve` process; `None` while stopped.
    child: Option<ChildGuard>,
    /// Kept across restarts so Envoy's `settlement` cluster finds it again.
    port: u16,
    database_url: String,
    bin: PathBuf,
    /// Holds the log (appended to across restarts).
    dir: ScratchDir,
    extra_args: Vec<String>,
    /// Sent as `authorization: Bearer` on operator calls and by the CLI, when set.
    operator_token: Option<String>,
    /// Served over mutual TLS: the CA the harness trusts and the certificate it presents.
    tls: Option<ClientTls>,
}

/// What a client of a TLS settlement trusts and presents.
#[derive(Debug, Clone)]
struct ClientTls {
    ca: PathBuf,
    identity: CertFiles,
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("token is not a header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The operator client of the harness (with the operator token when one is set).
pub type OperatorApi =
    OperatorClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

impl Settlement {
    /// Starts `x402-settlement serve` on a free port against `database_url` and waits
    /// until it answers gRPC.
    pub async fn start(database_url: &str) -> Result<Settlement> {
        Settlement::start_with(database_url, None, &[]).await
    }

    /// Like [`Settlement::start`], on `port` when given and with extra `serve` flags.
    pub async fn start_with(
        database_url: &str,
        port: Option<u16>,
        extra_args: &[&str],
    ) -> Result<Settlement> {
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        Settlement::spawn_new(database_url, port, extra_args, None, None).await
    }

    /// Starts `serve` with `extra_args`; the harness's clients send `operator_token`
    /// and speak `tls` when set.
    async fn spawn_new(
        database_url: &str,
        port: u16,
        extra_args: Vec<String>,
        operator_token: Option<String>,
        tls: Option<ClientTls>,
    ) -> Result<Settlement> {
        let mut s = Settlement {
            child: None,
            port,
            database_url: database_url.to_string(),
            bin: paths::settlement_bin()?,
            dir: ScratchDir::new("settlement")?,
            extra_args,
            operator_token,
            tls,
        };
        s.spawn_and_wait().await?;
        Ok(s)
    }

    /// Starts settlement serving `pki`'s server certificate and requiring client
    /// certificates its CA signed, with `extra_args`; the harness presents
    /// `pki.client` (as the files hold it at each connection).
    pub async fn start_tls(
        database_url: &str,
        pki: &TestPki,
        extra_args: &[&str],
    ) -> Result<Settlement> {
        let path = |p: &PathBuf| p.display().to_string();
        let mut args = vec![
            "--tls-cert".into(),
            path(&pki.server.cert),
            "--tls-key".into(),
            path(&pki.server.key),
            "--tls-client-ca".into(),
            path(&pki.ca),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let tls = ClientTls {
            ca: pki.ca.clone(),
            identity: pki.client.clone(),
        };
        Settlement::spawn_new(database_url, free_port()?, args, None, Some(tls)).await
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--database-url")
            .arg(&self.database_url)
            .args(&self.extra_args)
            .env_remove("DATABASE_URL")
            .env_remove("X402_LISTEN")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let log = self.dir.path().join("settlement.log");
        self.child = Some(ChildGuard::spawn("x402-settlement", cmd, &log)?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(why) = child.exited() {
                    bail!("{why} before accepting gRPC; log:\n{}", child.log_tail(40));
                }
            }
            if let Ok(mut client) = self.operator().await {
                let probe = client
                    .get_account(GetAccountRequest {
                        account_id: "readiness-probe".into(),
                    })
                    .await;
                match probe {
                    Ok(_) => return Ok(()),
                    Err(status)
                        if status.code() != tonic::Code::Unavailable
                            && status.code() != tonic::Code::Unknown =>
                    {
                        return Ok(())
                    }
                    Err(_) => {}
                }
            }
            if start.elapsed() > READY_LIMIT {
                bail!(
                    "settlement did not answer gRPC within {READY_LIMIT:?}; log:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` (`https://` when served over TLS), what the CLI's
    /// `--server` takes.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("settlement.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log_path(), lines)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the service (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Asks the service to shut down gracefully (SIGTERM), killing it after `grace`.
    pub fn shutdown(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            child.terminate(grace);
        }
    }

    /// Starts the service again on the same port and database.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let mut last = None;
        // The port was just released; a few tries cover a slow socket teardown.
        for _ in 0..5 {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.stop();
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("settlement restart failed")))
    }

    /// A fresh Operator gRPC client.
    /// Starts settlement requiring `operator_token` on the Operator API and
    /// `dataplane_token` on the DataPlane API; the harness's clients send the former.
    pub async fn start_secured(
        database_url: &str,
        operator_token: &str,
        dataplane_token: &str,
    ) -> Result<Settlement> {
        let args = vec![
            "--operator-token".into(),
            operator_token.into(),
            "--dataplane-token".into(),
            dataplane_token.into(),
        ];
        let token = Some(operator_token.to_owned());
        Settlement::spawn_new(database_url, free_port()?, args, token, None).await
    }

    pub async fn operator(&self) -> Result<OperatorApi> {
        let mut endpoint = Endpoint::from_shared(self.url())?;
        if let Some(tls) = &self.tls {
            let identity = Identity::from_pem(
                std::fs::read(&tls.identity.cert)?,
                std::fs::read(&tls.identity.key)?,
            );
            endpoint = endpoint.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(std::fs::read(&tls.ca)?))
                    .identity(identity),
            )?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .context("connecting to settlement")?;
        Ok(OperatorClient::with_interceptor(
            channel,
            Bearer(self.operator_token.clone()),
        ))
    }

    pub async fn create_account(&self, account_id: &str, kind: AccountKind) -> Result<()> {
        self.operator()
            .await?
            .create_account(CreateAccountRequest {
                account_id: account_id.into(),
                kind: kind.into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating account {account_id}"))?;
        Ok(())
    }

    pub async fn add_key(&self, account_id: &str, public_key_hex: &str) -> Result<()> {
        self.operator()
            .await?
            .add_key(AddKeyRequest {
                account_id: account_id.into(),
                public_key: public_key_hex.into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("adding a key to {account_id}"))?;
        Ok(())
    }

    pub async fn revoke_key(&self, public_key_hex: &str) -> Result<()> {
        self.operator()
            .await?
            .revoke_key(RevokeKeyRequest {
                public_key: public_key_hex.into(),
                ..Default::default()
            })
            .await
            .context("revoking a key")?;
        Ok(())
    }

    /// Credits `amount` atomic units of `asset` to `account_id`.
    pub async fn deposit(&self, account_id: &str, asset: &str, amount: u64) -> Result<Balance> {
        let response = self
            .operator()
            .await?
            .deposit(DepositRequest {
                account_id: account_id.into(),
                asset: asset.into(),
                amount,
                idempotency_key: String::new(),
            })
            .await
            .with_context(|| format!("depositing {amount} {asset} to {account_id}"))?
            .into_inner();
        response
            .balance
            .context("deposit answered without a balance")
    }

    pub async fn balance(&self, account_id: &str, asset: &str) -> Result<Balance> {
        Ok(self
            .operator()
            .await?
            .get_balance(GetBalanceRequest {
                account_id: account_id.into(),
                asset: asset.into(),
            })
            .await
            .with_context(|| format!("balance of {account_id}"))?
            .into_inner())
    }

    pub async fn payment(&self, transaction_id: &str) -> Result<Payment> {
        Ok(self
            .operator()
            .await?
            .get_payment(GetPaymentRequest {
                transaction_id: transaction_id.into(),
            })
            .await
            .with_context(|| format!("payment {transaction_id}"))?
            .into_inner())
    }

    /// The newest payments (at most 500) of a payer account.
    pub async fn payments_of(&self, payer_account: &str) -> Result<Vec<Payment>> {
        Ok(self
            .operator()
            .await?
            .list_payments(ListPaymentsRequest {
                payer_account: payer_account.into(),
                merchant_account: String::new(),
                page_size: 500,
                page_token: String::new(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("payments of {payer_account}"))?
            .into_inner()
            .payments)
    }

    /// Runs an operator CLI subcommand against this service (via `X402_SETTLEMENT_URL`).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env("X402_SETTLEMENT_URL", self.url());
        if let Some(tls) = &self.tls {
            cmd.env("X402_SETTLEMENT_CA_FILE", &tls.ca)
                .env("X402_SETTLEMENT_CERT_FILE", &tls.identity.cert)
                .env("X402_SETTLEMENT_KEY_FILE", &tls.identity.key);
        }
        match &self.operator_token {
            Some(token) => cmd.env("X402_OPERATOR_TOKEN", token),
            None => cmd.env_remove("X402_OPERATOR_TOKEN"),
        };
        cmd.output()
            .with_context(|| format!("running x402-settlement {args:?}"))
    }
}
