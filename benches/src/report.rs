//! The benchmark's results: per scenario, the median over rounds of rate, latency
//! percentiles and CPU per request of each process; the ratios the targets are stated
//! in; printed as a Markdown table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::load::Measured;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    BareProxy,
    DirectResponse,
    Reject402,
    Unpriced,
    PaidFlat,
    PaidMetered,
    ExtAuthz,
    SettleSpread,
    PgbenchSpread,
    SettleHot,
    PgbenchHot,
    SettleOnePhase,
}

impl Scenario {
    /// The order of one round.
    pub const ALL: [Scenario; 12] = [
        Scenario::BareProxy,
        Scenario::DirectResponse,
        Scenario::Reject402,
        Scenario::Unpriced,
        Scenario::PaidFlat,
        Scenario::PaidMetered,
        Scenario::ExtAuthz,
        Scenario::SettleSpread,
        Scenario::PgbenchSpread,
        Scenario::SettleHot,
        Scenario::PgbenchHot,
        Scenario::SettleOnePhase,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::BareProxy => "1 bare Envoy proxy",
            Scenario::DirectResponse => "2 direct_response (402 size)",
            Scenario::Reject402 => "3 x402 402 reject",
            Scenario::Unpriced => "3b x402 unpriced route (proxied)",
            Scenario::PaidFlat => "4 x402 paid flat",
            Scenario::PaidMetered => "5 x402 paid metered",
            Scenario::ExtAuthz => "6 ext_authz peer (paid)",
            Scenario::SettleSpread => "7a settlement pairs, 10k payers",
            Scenario::PgbenchSpread => "7b pgbench stmt, 10k payers",
            Scenario::SettleHot => "7c settlement pairs, hot payer",
            Scenario::PgbenchHot => "7d pgbench stmt, hot payer",
            Scenario::SettleOnePhase => "7e settlement one-phase, 10k payers",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Scenario::BareProxy => "bare_proxy",
            Scenario::DirectResponse => "direct_response",
            Scenario::Reject402 => "x402_reject",
            Scenario::Unpriced => "x402_unpriced",
            Scenario::PaidFlat => "x402_paid_flat",
            Scenario::PaidMetered => "x402_paid_metered",
            Scenario::ExtAuthz => "ext_authz_peer",
            Scenario::SettleSpread => "settlement_spread",
            Scenario::PgbenchSpread => "pgbench_spread",
            Scenario::SettleHot => "settlement_hot",
            Scenario::PgbenchHot => "pgbench_hot",
            Scenario::SettleOnePhase => "settlement_one_phase",
        }
    }

    /// Whether a process takes part in the scenario (the others are idle).
    pub fn uses(self, process: &str) -> bool {
        let wanted: &[&str] = match self {
            Scenario::BareProxy => &["envoy", "upstream", "load client"],
            Scenario::DirectResponse => &["envoy", "load client"],
            Scenario::Reject402 => &["envoy+x402", "load client"],
            Scenario::Unpriced => &["envoy+x402", "upstream", "load client"],
            Scenario::PaidFlat | Scenario::PaidMetered => &[
                "envoy+x402",
                "upstream",
                "settlement",
                "postgres",
                "load client",
            ],
            Scenario::ExtAuthz => &[
                "envoy+ext_authz",
                "upstream",
                "ext_authz peer",
                "postgres",
                "load client",
            ],
            Scenario::SettleSpread | Scenario::SettleHot | Scenario::SettleOnePhase => {
                &["settlement", "postgres", "load client"]
            }
            Scenario::PgbenchSpread | Scenario::PgbenchHot => &["postgres"],
        };
        wanted.contains(&process)
    }

    fn is_pgbench(self) -> bool {
        matches!(self, Scenario::PgbenchSpread | Scenario::PgbenchHot)
    }
}

#[derive(Debug, Clone)]
pub struct RoundResult {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub cpu_us_per_request: Vec<(String, f64)>,
}

impl RoundResult {
    pub fn of(m: &Measured, cpu: Vec<(String, f64)>) -> RoundResult {
        RoundResult {
            rate: m.rate(),
            p50_us: m.percentile_us(50.0),
            p99_us: m.percentile_us(99.0),
            errors: m.errors,
            first_error: m.first_error.clone(),
            cpu_us_per_request: cpu,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

pub struct Report {
    quick: bool,
    rounds: usize,
    duration: Duration,
    connections: usize,
    settle_concurrency: usize,
    payers: usize,
    pub settlement_args: String,
    /// `BENCH_PG_SETTINGS` (empty: the test cluster's, commits not waiting for the disk).
    pub pg_settings: String,
    /// One WAL flush on the cluster's disk (`pg_test_fsync`'s fdatasync), when measured.
    pub wal_flush_us: Option<u64>,
    /// Items per Authorize and per Capture call of the settlement load client.
    pub settle_batch: usize,
    /// `BENCH_ONLY`'s scenario keys (empty: every scenario ran).
    pub only: Vec<String>,
    /// Past payments written into the ledger before the first round.
    pub history: u64,
    results: BTreeMap<Scenario, Vec<RoundResult>>,
    /// Total rate of the half-load runs, and per round (bare p50, bare p99, paid p50, paid p99).
    pub half_load_rate: f64,
    pub half_load: Vec<(f64, f64, f64, f64)>,
    pub wasm_bytes: u64,
    pub envoy_rss_kib: u64,
    pub envoy_x402_rss_kib: u64,
    /// gRPC calls from the filter Envoy to settlement, and paid requests, over all rounds.
    pub settlement_calls: u64,
    pub paid_requests: u64,
    pub elapsed_seconds: f64,
    /// (table, sequential scans, rows read by them, index scans) over the run.
    pub table_scans: Vec<(String, i64, i64, i64)>,
}

/// One median row.
struct Row {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    first_error: Option<String>,
    cpu: Vec<(String, f64)>,
}

impl Report {
    pub fn new(
        quick: bool,
        rounds: usize,
        duration: Duration,
        connections: usize,
        settle_concurrency: usize,
        payers: usize,
    ) -> Report {
        Report {
            quick,
            rounds,
            duration,
            connections,
            settle_concurrency,
            payers,
            settlement_args: String::new(),
            pg_settings: String::new(),
            wal_flush_us: None,
            settle_batch: 1,
            only: Vec::new(),
            history: 0,
            results: BTreeMap::new(),
            half_load_rate: 0.0,
            half_load: Vec::new(),
            wasm_bytes: 0,
            envoy_rss_kib: 0,
            envoy_x402_rss_kib: 0,
            settlement_calls: 0,
            paid_requests: 0,
            elapsed_seconds: 0.0,
            table_scans: Vec::new(),
        }
    }

    pub fn push(&mut self, scenario: Scenario, result: RoundResult) {
        self.results.entry(scenario).or_default().push(result);
    }

    pub fn median_rate(&self, scenario: Scenario) -> Option<f64> {
        self.row(scenario).map(|r| r.rate)
    }

    fn row(&self, scenario: Scenario) -> Option<Row> {
        let rounds = self.results.get(&scenario)?;
        let pick = |f: &dyn Fn(&RoundResult) -> f64| median(rounds.iter().map(f).collect());
        let mut names: Vec<String> = Vec::new();
        for r in rounds {
            for (n, _) in &r.cpu_us_per_request {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        let cpu = names
            .into_iter()
            .map(|n| {
                let v = median(
                    rounds
                        .iter()
                        .filter_map(|r| {
                            r.cpu_us_per_request
                                .iter()
                                .find(|(m, _)| *m == n)
                                .map(|(_, v)| *v)
                        })
                        .collect(),
                )
                .unwrap_or(0.0);
                (n, v)
            })
            .collect();
        Some(Row {
            rate: pick(&|r| r.rate)?,
            p50: pick(&|r| r.p50_us)?,
            p99: pick(&|r| r.p99_us)?,
            errors: rounds.iter().map(|r| r.errors).sum(),
            first_error: rounds.iter().find_map(|r| r.first_error.clone()),
            cpu,
        })
    }

    /// The median of the per-round ratios of `a`'s rate to `b`'s. Each round runs the
    /// scenarios back to back, so a machine that slows down between rounds moves both
    /// sides of a round's ratio, where a ratio of medians would mix fast and slow rounds.
    fn ratio(&self, a: Scenario, b: Scenario) -> Option<f64> {
        median(self.round_ratios(a, b))
    }

    fn round_ratios(&self, a: Scenario, b: Scenario) -> Vec<f64> {
        match (self.results.get(&a), self.results.get(&b)) {
            (Some(a), Some(b)) => a
                .iter()
                .zip(b)
                .filter(|(_, b)| b.rate > 0.0)
                .map(|(a, b)| a.rate / b.rate)
                .collect(),
            _ => Vec::new(),
        }
    }

    fn added_latency(&self) -> Option<(f64, f64)> {
        let p50 = median(self.half_load.iter().map(|h| h.2 - h.0).collect())?;
        let p99 = median(self.half_load.iter().map(|h| h.3 - h.1).collect())?;
        Some((p50, p99))
    }

    /// (what, measured, target, met) for every target of the issue.
    fn targets(&self) -> Vec<(String, Option<f64>, String, Option<bool>)> {
        let mut t = Vec::new();
        let mut at_least = |what: &str, v: Option<f64>, min: f64| {
            t.push((what.to_owned(), v, format!(">= {min}"), v.map(|v| v >= min)));
        };
        at_least(
            "402 reject / direct_response throughput",
            self.ratio(Scenario::Reject402, Scenario::DirectResponse),
            0.85,
        );
        at_least(
            "paid flat / bare proxy throughput",
            self.ratio(Scenario::PaidFlat, Scenario::BareProxy),
            0.60,
        );
        at_least(
            "paid flat / ext_authz peer throughput",
            self.ratio(Scenario::PaidFlat, Scenario::ExtAuthz),
            1.5,
        );
        at_least(
            "settlement pairs / pgbench statements (10k payers)",
            self.ratio(Scenario::SettleSpread, Scenario::PgbenchSpread),
            3.0,
        );
        at_least(
            "settlement one-phase payments / pgbench statements (10k payers)",
            self.ratio(Scenario::SettleOnePhase, Scenario::PgbenchSpread),
            3.0,
        );
        at_least(
            "settlement hot / settlement spread",
            self.ratio(Scenario::SettleHot, Scenario::SettleSpread),
            0.9,
        );
        let added = self.added_latency();
        let mut at_most = |what: &str, v: Option<f64>, max: f64| {
            t.push((what.to_owned(), v, format!("<= {max}"), v.map(|v| v <= max)));
        };
        at_most("added p50 at half load (us)", added.map(|a| a.0), 500.0);
        at_most("added p99 at half load (us)", added.map(|a| a.1), 2000.0);
        at_most(
            "filter .wasm (KB)",
            Some(self.wasm_bytes as f64 / 1000.0),
            400.0,
        );
        let mem = (self.envoy_rss_kib > 0)
            .then(|| self.envoy_x402_rss_kib as f64 / self.envoy_rss_kib as f64);
        at_most("Envoy RSS with filter / without", mem, 1.3);
        t
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## 402x benchmark{}\n\n{} rounds x {} s per scenario, interleaved, medians; {} HTTP connections; settlement: {} calls in flight of {} items each (Authorize, then Capture of the same items); pgbench at concurrency {}; {} payers, {} past payments in the ledger; Envoy --concurrency 1; settlement args: `{}`; Postgres: {}{}; {:.0} s in all.\n",
            if self.quick { " (quick)" } else { "" },
            self.rounds,
            self.duration.as_secs(),
            self.connections,
            self.settle_concurrency,
            self.settle_batch,
            self.settle_concurrency,
            self.payers,
            self.history,
            if self.settlement_args.is_empty() { "(defaults)" } else { &self.settlement_args },
            if self.pg_settings.is_empty() {
                "the test cluster's settings (fsync off)".to_owned()
            } else {
                format!("`{}`", self.pg_settings)
            },
            match self.wal_flush_us {
                Some(us) => format!(" (one WAL flush on its disk: {us} us, pg_test_fsync)"),
                None => String::new(),
            },
            self.elapsed_seconds
        );
        let _ = writeln!(
            s,
            "| scenario | req/s | p50 us | p99 us | errors | CPU us per request |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | --- |");
        for scenario in Scenario::ALL {
            match self.row(scenario) {
                Some(r) => {
                    let cpu: Vec<String> =
                        r.cpu.iter().map(|(n, v)| format!("{n} {v:.0}")).collect();
                    let (p50, p99) = if scenario.is_pgbench() {
                        (format!("{:.0} (avg)", r.p50), "-".to_string())
                    } else {
                        (format!("{:.0}", r.p50), format!("{:.0}", r.p99))
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {:.0} | {p50} | {p99} | {} | {} |",
                        scenario.label(),
                        r.rate,
                        r.errors,
                        cpu.join(", ")
                    );
                }
                None => {
                    let why = if !self.only.is_empty()
                        && !self.only.iter().any(|k| k == scenario.key())
                    {
                        "not run (`BENCH_ONLY`)"
                    } else if scenario.is_pgbench() {
                        "not available: pgbench not found"
                    } else {
                        "not available"
                    };
                    let _ = writeln!(s, "| {} | - | - | - | - | {why} |", scenario.label());
                }
            }
        }
        if let Some(e) = Scenario::ALL
            .iter()
            .filter_map(|sc| {
                self.row(*sc)
                    .and_then(|r| r.first_error.map(|e| (sc.label(), e)))
            })
            .next()
        {
            let _ = writeln!(s, "\nFirst error seen: {}: {}", e.0, e.1);
        }
        let _ = writeln!(
            s,
            "\n| target | measured | target | met |\n| --- | ---: | ---: | --- |"
        );
        for (what, v, target, met) in self.targets() {
            let v = v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
            let met = match met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            };
            let _ = writeln!(s, "| {what} | {v} | {target} | {met} |");
        }
        let per_round: Vec<String> = [
            (
                "402 / direct_response",
                Scenario::Reject402,
                Scenario::DirectResponse,
            ),
            ("paid / bare", Scenario::PaidFlat, Scenario::BareProxy),
            ("paid / peer", Scenario::PaidFlat, Scenario::ExtAuthz),
            (
                "pairs / pgbench",
                Scenario::SettleSpread,
                Scenario::PgbenchSpread,
            ),
            ("hot / spread", Scenario::SettleHot, Scenario::SettleSpread),
            (
                "one-phase / pgbench",
                Scenario::SettleOnePhase,
                Scenario::PgbenchSpread,
            ),
        ]
        .iter()
        .filter_map(|(what, a, b)| {
            let r = self.round_ratios(*a, *b);
            (!r.is_empty()).then(|| {
                let r: Vec<String> = r.iter().map(|v| format!("{v:.2}")).collect();
                format!("{what} {}", r.join(", "))
            })
        })
        .collect();
        let _ = writeln!(
            s,
            "\nThroughput ratios are the medians of the per-round ratios (each round runs the scenarios back to back); per round: {}.",
            if per_round.is_empty() { "-".to_owned() } else { per_round.join("; ") }
        );
        let _ = writeln!(s, "\nHalf load: {:.0} req/s for both bare proxy and paid flat; per round (bare p50/p99, paid p50/p99 us): {}",
            self.half_load_rate,
            self.half_load.iter().map(|h| format!("{:.0}/{:.0} vs {:.0}/{:.0}", h.0, h.1, h.2, h.3)).collect::<Vec<_>>().join("; "));
        let per = if self.paid_requests > 0 {
            self.settlement_calls as f64 / self.paid_requests as f64
        } else {
            0.0
        };
        let _ = writeln!(s, "Filter batching: {} settlement calls for {} paid requests = {per:.3} calls per paid request (2.0 = one Authorize and one Capture each, unbatched).", self.settlement_calls, self.paid_requests);
        let _ = writeln!(
            s,
            "Memory: Envoy {} KiB RSS without the filter, {} KiB with it; filter .wasm {} bytes.",
            self.envoy_rss_kib, self.envoy_x402_rss_kib, self.wasm_bytes
        );
        let scans: Vec<String> = self
            .table_scans
            .iter()
            .filter(|t| t.1 > 0)
            .map(|t| {
                format!(
                    "{} {} seq scans ({} rows read), {} index scans",
                    t.0, t.1, t.2, t.3
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "Postgres tables read sequentially during the run: {}.",
            if scans.is_empty() {
                "none".to_string()
            } else {
                scans.join("; ")
            }
        );
        s
    }

    pub fn json(&self) -> Value {
        let mut scenarios = serde_json::Map::new();
        for scenario in Scenario::ALL {
            let value = match self.row(scenario) {
                Some(r) => json!({
                    "label": scenario.label(),
                    "requests_per_second": r.rate,
                    "p50_us": r.p50,
                    "p99_us": r.p99,
                    "errors": r.errors,
                    "cpu_us_per_request": r.cpu.iter().cloned().collect::<BTreeMap<_, _>>(),
                    "rounds": self.results.get(&scenario).map(|v| v.iter().map(|r| json!({"rate": r.rate, "p50_us": r.p50_us, "p99_us": r.p99_us, "errors": r.errors})).collect::<Vec<_>>()),
                }),
                None => json!({"label": scenario.label(), "available": false}),
            };
            scenarios.insert(scenario.key().to_owned(), value);
        }
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|(what, v, target, met)| json!({"what": what, "measured": v, "target": target, "met": met}))
            .collect();
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "seconds_per_scenario": self.duration.as_secs(),
            "http_connections": self.connections,
            "settlement_concurrency": self.settle_concurrency,
            "settlement_items_per_call": self.settle_batch,
            "payers": self.payers,
            "past_payments": self.history,
            "settlement_args": self.settlement_args,
            "pg_settings": self.pg_settings,
            "wal_flush_us": self.wal_flush_us,
            "scenarios": scenarios,
            "targets": targets,
            "half_load": {"rate": self.half_load_rate, "rounds": self.half_load.iter().map(|h| json!({"bare_p50_us": h.0, "bare_p99_us": h.1, "paid_p50_us": h.2, "paid_p99_us": h.3})).collect::<Vec<_>>()},
            "settlement_calls": self.settlement_calls,
            "paid_requests": self.paid_requests,
            "envoy_rss_kib": self.envoy_rss_kib,
            "envoy_x402_rss_kib": self.envoy_x402_rss_kib,
            "wasm_bytes": self.wasm_bytes,
            "elapsed_seconds": self.elapsed_seconds,
            "table_scans": self.table_scans.iter().map(|t| json!({"table": t.0, "seq_scan": t.1, "seq_tup_read": t.2, "idx_scan": t.3})).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn round(rate: f64) -> RoundResult {
        RoundResult {
            rate,
            p50_us: 1.0,
            p99_us: 1.0,
            errors: 0,
            first_error: None,
            cpu_us_per_request: Vec::new(),
        }
    }

    /// A machine that slows down between rounds slows both scenarios of a round: the
    /// ratio is taken per round, not from the two medians (which here say 0.6).
    #[test]
    fn ratios_pair_the_scenarios_of_each_round() {
        let mut r = Report::new(false, 3, Duration::from_secs(1), 16, 16, 10);
        for (paid, peer) in [(100.0, 200.0), (60.0, 100.0), (30.0, 80.0)] {
            r.push(Scenario::PaidFlat, round(paid));
            r.push(Scenario::ExtAuthz, round(peer));
        }
        assert_eq!(r.ratio(Scenario::PaidFlat, Scenario::ExtAuthz), Some(0.5));
        assert_eq!(
            r.round_ratios(Scenario::PaidFlat, Scenario::ExtAuthz),
            vec![0.5, 0.6, 0.375]
        );
        assert!(r.markdown().contains("paid / peer 0.50, 0.60, 0.38"));
        assert_eq!(r.ratio(Scenario::PaidFlat, Scenario::BareProxy), None);
    }
}
