//! The gRPC server and its background worker, started from an already bound
//! listener so tests can bind `127.0.0.1:0` and run it in-process.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use x402_proto::settlement::v1::data_plane_server::DataPlaneServer;
use x402_proto::settlement::v1::operator_server::OperatorServer;

use tokio::sync::broadcast;

use crate::auth::BearerToken;
use crate::grpc::{DataPlaneService, OperatorService};
use crate::ledger::Ledger;
use crate::webhooks::WebhookConfig;

/// Accepted connections with Nagle's algorithm off. A gRPC answer leaves as several small
/// writes (headers, message, trailers); with Nagle on, the later ones wait for the peer's
/// delayed ACK (40 ms on Linux), which added ~35 ms to every Authorize seen by Envoy.
/// tonic sets `TCP_NODELAY` only on listeners it binds itself.
pub fn without_nagle(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "could not turn Nagle's algorithm off");
            }
        })
    })
}

/// Events folded into analytics per transaction.
const FOLD_BATCH: i64 = 5000;

/// Holds the sweeper expires per transaction.
const SWEEP_BATCH: i64 = 500;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How often unresolved holds past their TTL are expired.
    pub hold_sweep_interval: Duration,
    /// Bearer token the Operator API requires (none: open, for development).
    pub operator_token: BearerToken,
    /// Bearer token the DataPlane API requires (the filter's `settlement_token`).
    pub dataplane_token: BearerToken,
    /// How often pending analytics events are folded into the aggregates.
    pub analytics_interval: Duration,
    /// Webhook delivery from the outbox.
    pub webhooks: WebhookConfig,
    /// Group-commit tasks for authorizations, and as many for captures and voids:
    /// each applies the items queued meanwhile in one transaction.
    pub group_committers: usize,
    /// TLS (and client certificates, when it names a client CA) on the gRPC listener;
    /// plaintext when unset ([`crate::tls`]).
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// How often the TLS files are read again for a renewed certificate.
    pub tls_reload_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hold_sweep_interval: Duration::from_millis(1000),
            operator_token: BearerToken::default(),
            dataplane_token: BearerToken::default(),
            analytics_interval: Duration::from_millis(500),
            webhooks: WebhookConfig::default(),
            group_committers: DEFAULT_GROUP_COMMITTERS,
            tls: None,
            tls_reload_interval: DEFAULT_TLS_RELOAD_INTERVAL,
        }
    }
}

/// Default of [`ServerConfig::tls_reload_interval`].
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Default of [`ServerConfig::group_committers`].
pub const DEFAULT_GROUP_COMMITTERS: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Serves DataPlane, Operator, grpc.health.v1 and reflection on `listener` until
/// `shutdown` completes, then lets in-flight calls finish and stops the workers.
pub async fn run(
    listener: TcpListener,
    pool: PgPool,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_http(listener, None, pool, config, shutdown).await
}

/// Like [`run`], and serves `/metrics` and the dashboard on `http` when given.
pub async fn run_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    pool: PgPool,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ledger = Ledger::new(pool.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DataPlaneServer<DataPlaneService>>()
        .await;
    health_reporter
        .set_serving::<OperatorServer<OperatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(x402_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, _) = broadcast::channel(4096);
    let workers = vec![
        tokio::spawn(sweep_expired_holds(
            ledger.clone(),
            config.hold_sweep_interval,
            stop_rx.clone(),
        )),
        tokio::spawn(fold_analytics(
            pool.clone(),
            config.analytics_interval,
            stop_rx.clone(),
        )),
        tokio::spawn(crate::webhooks::run(
            pool.clone(),
            config.webhooks.clone(),
            stop_rx.clone(),
        )),
        tokio::spawn(crate::events::listen(
            pool.clone(),
            events_tx.clone(),
            stop_rx.clone(),
        )),
    ];
    let (recorder_tx, recorder_rx) = tokio::sync::mpsc::channel(crate::events::RECORDER_QUEUE);
    let recorder = tokio::spawn(crate::events::run_recorder(pool.clone(), recorder_rx));
    let http_task = http.map(|l| {
        tokio::spawn(crate::http::serve(
            l,
            pool.clone(),
            config.operator_token.clone(),
            stop_rx.clone(),
        ))
    });

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            operator_token = config.operator_token.is_set(),
            dataplane_token = config.dataplane_token.is_set(),
            tls = config.tls.is_some(),
            "settlement listening"
        );
    }
    // Watch streams end when shutdown starts, so the server's drain does not wait
    // for them; the workers stop only after the last call has finished.
    let (drain_tx, drain_rx) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = drain_tx.send(true);
    };
    let operator = OperatorService::new(ledger.clone()).with_events(events_tx, drain_rx);
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(DataPlaneServer::with_interceptor(
            DataPlaneService::new(ledger.clone(), config.group_committers)
                .with_recorder(recorder_tx),
            config.dataplane_token.interceptor(),
        ))
        .add_service(OperatorServer::with_interceptor(
            operator,
            config.operator_token.interceptor(),
        ));
    let served = match &config.tls {
        Some(tls) => {
            let acceptor = tls.acceptor()?;
            let watch = tls.watch(config.tls_reload_interval);
            let served = router
                .serve_with_incoming_shutdown(
                    crate::tls::accept(without_nagle(listener), acceptor),
                    shutdown,
                )
                .await;
            watch.abort();
            served
        }
        None => {
            router
                .serve_with_incoming_shutdown(without_nagle(listener), shutdown)
                .await
        }
    };
    // In-flight calls have finished (and dropped the recorder's senders with the
    // services): the recorder writes what is queued, then each worker finishes its round.
    if let Err(e) = recorder.await {
        tracing::error!(error = %e, "the analytics recorder stopped abnormally");
    }
    let _ = stop_tx.send(true);
    for worker in workers {
        if let Err(e) = worker.await {
            tracing::error!(error = %e, "a background worker stopped abnormally");
        }
    }
    if let Some(task) = http_task {
        let _ = task.await;
    }
    // Fold what the last calls left, so analytics lose nothing across restarts
    // (they would be folded by the next start anyway).
    let _ = crate::analytics::fold_pending(&pool, FOLD_BATCH).await;
    tracing::info!("settlement stopped");
    Ok(served?)
}

/// Folds pending analytics events into the aggregates every `interval`.
async fn fold_analytics(pool: PgPool, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        loop {
            match crate::analytics::fold_pending(&pool, FOLD_BATCH).await {
                Ok(n) if n as i64 == FOLD_BATCH && !*stop.borrow() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "analytics fold failed");
                    break;
                }
            }
        }
    }
}

/// Expires holds nobody resolved, and forgets rate-limit windows that are over, every
/// `interval`, until told to stop.
async fn sweep_expired_holds(ledger: Ledger, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        // Drain a backlog batch by batch, but yield to shutdown between batches.
        loop {
            match ledger.expire_due_holds(SWEEP_BATCH).await {
                Ok(n) if n as i64 == SWEEP_BATCH && !*stop.borrow() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "hold sweep failed");
                    break;
                }
            }
        }
        if let Err(e) = crate::limits::prune_ended_windows(ledger.pool()).await {
            tracing::warn!(error = %e, "pruning ended rate-limit windows failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut incoming = Box::pin(without_nagle(listener));
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
        // The client side is the caller's business: it is untouched.
        assert!(!client.nodelay().unwrap());
    }
}
