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

use crate::grpc::{DataPlaneService, OperatorService};
use crate::ledger::Ledger;

/// Holds the sweeper expires per transaction.
const SWEEP_BATCH: i64 = 500;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How often unresolved holds past their TTL are expired.
    pub hold_sweep_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hold_sweep_interval: Duration::from_millis(1000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves DataPlane, Operator, grpc.health.v1 and reflection on `listener` until
/// `shutdown` completes, then lets in-flight calls finish and stops the sweeper.
pub async fn run(
    listener: TcpListener,
    pool: PgPool,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ledger = Ledger::new(pool);
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
    let sweeper = tokio::spawn(sweep_expired_holds(
        ledger.clone(),
        config.hold_sweep_interval,
        stop_rx,
    ));

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "settlement listening");
    }
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(DataPlaneServer::new(DataPlaneService::new(ledger.clone())))
        .add_service(OperatorServer::new(OperatorService::new(ledger)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    let _ = stop_tx.send(true);
    if let Err(e) = sweeper.await {
        tracing::error!(error = %e, "hold sweeper stopped abnormally");
    }
    tracing::info!("settlement stopped");
    Ok(served?)
}

/// Expires holds nobody resolved, every `interval`, until told to stop.
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
    }
}
