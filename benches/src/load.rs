//! A closed-loop HTTP/1.1 load generator (keep-alive connections, one request in flight
//! per connection), optionally paced to a fixed total rate. Every run is bounded by its
//! duration; latencies are recorded per request after the warm-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Builds the `n`-th request of a connection (paid requests sign a fresh proof).
pub type MakeRequest = Arc<dyn Fn() -> Result<Request<Empty<Bytes>>> + Send + Sync>;

#[derive(Clone)]
pub struct HttpLoad {
    pub port: u16,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Total requests per second across connections; `None` = as fast as answers come.
    pub rate: Option<f64>,
    pub expect_status: u16,
    pub make: MakeRequest,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Requests answered with the expected status inside the window.
    pub ok: u64,
    /// Expected answers including the warm-up: what the CPU samples cover.
    pub ok_all: u64,
    /// Other statuses and transport errors inside the window.
    pub errors: u64,
    pub seconds: f64,
    /// Sorted latencies in microseconds of the requests inside the window.
    pub latencies_us: Vec<u32>,
    /// One unexpected answer, for the report.
    pub first_error: Option<String>,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn percentile_us(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p)
    }

    pub fn merge(&mut self, other: Measured) {
        self.ok += other.ok;
        self.ok_all += other.ok_all;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)])
}

pub async fn run(load: HttpLoad) -> Result<Measured> {
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut tasks = Vec::with_capacity(load.connections);
    for i in 0..load.connections {
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            connection(load, i, measure_from, end).await
        }));
    }
    let mut total = Measured::default();
    for t in tasks {
        total.merge(t.await.context("load task failed")??);
    }
    total.seconds = load.duration.as_secs_f64();
    total.latencies_us.sort_unstable();
    Ok(total)
}

async fn connect(port: u16) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn connection(
    load: HttpLoad,
    index: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<Measured> {
    let mut out = Measured::default();
    let mut sender = connect(load.port).await?;
    let mut pacer = load.rate.map(|rate| {
        let per_conn = (rate / load.connections as f64).max(0.001);
        let period = Duration::from_secs_f64(1.0 / per_conn);
        // Spread the connections' ticks over one period.
        let offset = period.mul_f64(index as f64 / load.connections as f64);
        let mut interval = tokio::time::interval_at((Instant::now() + offset).into(), period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    while Instant::now() < end {
        if let Some(p) = pacer.as_mut() {
            p.tick().await;
        }
        let request = (load.make)()?;
        let sent = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, body))
        })
        .await;
        let done = Instant::now();
        let inside = sent >= measure_from && done <= end;
        match answer {
            Ok(Ok((status, _))) if status == load.expect_status => {
                out.ok_all += 1;
                if inside {
                    out.ok += 1;
                    let us = done.duration_since(sent).as_micros();
                    out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            other => {
                if inside {
                    out.errors += 1;
                }
                if out.first_error.is_none() {
                    out.first_error = Some(match other {
                        Ok(Ok((status, body))) => format!(
                            "status {status}: {}",
                            String::from_utf8_lossy(&body)
                                .chars()
                                .take(200)
                                .collect::<String>()
                        ),
                        Ok(Err(e)) => format!("{e:#}"),
                        Err(_) => "timed out after 10 s".into(),
                    });
                }
                // A failed exchange may leave the connection unusable.
                sender = connect(load.port).await?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 50.0), 51.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
