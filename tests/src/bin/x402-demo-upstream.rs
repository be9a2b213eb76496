//! The demo upstream on its own: `x402-demo-upstream --listen 127.0.0.1:PORT`.
//! Serves what the end-to-end tests' upstream serves (see `x402_e2e::upstream`) until
//! Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use x402_e2e::upstream::{serve, Served};

#[derive(Parser)]
#[command(
    about = "Demo HTTP upstream for 402x: /paid/*, /free/* echo as JSON; /status/NNN answers NNN"
)]
struct Args {
    /// Address to listen on (loopback only by default).
    #[arg(long, env = "X402_UPSTREAM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "demo upstream listening on http://{}",
        listener.local_addr()?
    );
    serve(listener, Arc::new(Served::default()), shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
