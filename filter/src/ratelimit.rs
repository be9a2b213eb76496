//! Counters shared by every worker VM of one Envoy, kept in proxy-wasm shared data
//! and updated with compare-and-swap, so two workers never both spend the last token.
//!
//! - Rate limits are a token bucket in its GCRA form: one stored number, the
//!   theoretical arrival time (TAT) of the next request. `max_requests` per
//!   `window_seconds` is a bucket of `max_requests` tokens refilled evenly over the
//!   window.
//! - Free tiers count requests in fixed windows aligned to the epoch: the first
//!   `requests` of each window are free.
//!
//! Limits are per Envoy: N Envoys allow up to N times the limit. Keys are never
//! deleted (proxy-wasm has no delete), so memory grows with the distinct clients and
//! payers seen by one Envoy.
//!
//! Envoy writes a missing key unconditionally (a CAS of 0 always succeeds), so two
//! workers creating the same key at once could overwrite each other's first update.
//! New keys are therefore created zeroed under one creation lock (a shared-data key
//! made at configuration time, taken with CAS, expiring after [`CREATE_LOCK_NANOS`]
//! should a VM die holding it), and only then updated with CAS.

use crate::host::{Host, SharedDataError};
use crate::policy::{FreeTier, RateLimit};

/// CAS attempts before giving up; the request is then let through (and not counted)
/// rather than stalled.
const MAX_ATTEMPTS: usize = 64;
const NANOS: u64 = 1_000_000_000;
/// Shared-data key of the lock held while creating a counter key.
pub const CREATE_LOCK: &str = "x402.create-lock";
/// A creation lock older than this is free again.
pub const CREATE_LOCK_NANOS: u64 = 1_000_000_000;
const ZEROED: [u8; 16] = [0u8; 16];

/// Creates the creation lock; called when the plugin is configured, before traffic, so
/// workers never race to create it.
pub fn prepare(host: &mut dyn Host) {
    if host.get_shared_data(CREATE_LOCK).is_none() {
        // Nothing to do on failure: creation then falls back to an unlocked write.
        let _ = host.set_shared_data(CREATE_LOCK, &0u64.to_le_bytes(), 0);
    }
}

fn create_unless_present(host: &mut dyn Host, key: &str) -> bool {
    host.get_shared_data(key).is_some() || host.set_shared_data(key, &ZEROED, 0).is_ok()
}

/// Creates `key` zeroed if it does not exist, under the creation lock.
fn create_zeroed(host: &mut dyn Host, key: &str, now_nanos: u64) -> bool {
    for _ in 0..MAX_ATTEMPTS {
        let Some((lock, cas)) = host.get_shared_data(CREATE_LOCK) else {
            prepare(host);
            continue;
        };
        if read_u64(Some(&lock), 0) > now_nanos {
            // Another worker is creating a key: a few host calls, then it is free.
            continue;
        }
        let until = now_nanos.saturating_add(CREATE_LOCK_NANOS);
        if host
            .set_shared_data(CREATE_LOCK, &until.to_le_bytes(), cas)
            .is_err()
        {
            continue;
        }
        let created = create_unless_present(host, key);
        // Only the holder writes a held lock, so releasing needs no CAS.
        let _ = host.set_shared_data(CREATE_LOCK, &0u64.to_le_bytes(), 0);
        return created;
    }
    create_unless_present(host, key)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAnswer {
    Allowed,
    Denied { retry_after_seconds: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeTierAnswer {
    Free { remaining: u64 },
    Exhausted,
}

/// Applies `update` to the value at `key` atomically. `update` gets the current
/// value (`None` when empty) and returns the new value (or `None` to write nothing)
/// and the answer.
fn update_shared<R>(
    host: &mut dyn Host,
    key: &str,
    now_nanos: u64,
    mut update: impl FnMut(Option<&[u8]>) -> (Option<Vec<u8>>, R),
) -> Option<R> {
    for _ in 0..MAX_ATTEMPTS {
        let Some((current, cas)) = host.get_shared_data(key) else {
            // Create it zeroed (no tokens spent, no free requests used), then go
            // round again to update it under CAS.
            if !create_zeroed(host, key, now_nanos) {
                return None;
            }
            continue;
        };
        let (next, answer) = update(if current.is_empty() {
            None
        } else {
            Some(&current)
        });
        let Some(next) = next else {
            return Some(answer);
        };
        match host.set_shared_data(key, &next, cas) {
            Ok(()) => return Some(answer),
            Err(SharedDataError::CasMismatch) => continue,
            Err(SharedDataError::Failed) => return None,
        }
    }
    None
}

fn read_u64(bytes: Option<&[u8]>, at: usize) -> u64 {
    bytes
        .and_then(|b| b.get(at..at + 8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// One GCRA decision: `tat` stored, `now`; returns the new TAT when allowed.
pub fn gcra(limit: &RateLimit, tat: u64, now: u64) -> Result<u64, u64> {
    let window = limit.window_seconds.saturating_mul(NANOS);
    let interval = (window / u64::from(limit.max_requests.max(1))).max(1);
    let tolerance = window.saturating_sub(interval);
    let tat = tat.max(now);
    let ahead = tat - now;
    if ahead > tolerance {
        let wait = ahead - tolerance;
        Err(wait.div_ceil(NANOS).max(1))
    } else {
        Ok(tat + interval)
    }
}

/// Spends one token of the bucket at `key`.
pub fn take_token(
    host: &mut dyn Host,
    key: &str,
    limit: &RateLimit,
    now_nanos: u64,
) -> LimitAnswer {
    let answer = update_shared(host, key, now_nanos, |current| {
        match gcra(limit, read_u64(current, 0), now_nanos) {
            Ok(tat) => (Some(tat.to_le_bytes().to_vec()), LimitAnswer::Allowed),
            Err(retry_after_seconds) => (
                None,
                LimitAnswer::Denied {
                    retry_after_seconds,
                },
            ),
        }
    });
    answer.unwrap_or(LimitAnswer::Allowed)
}

/// Uses one free request of the window at `key`, if any is left.
pub fn take_free(host: &mut dyn Host, key: &str, tier: &FreeTier, now_secs: u64) -> FreeTierAnswer {
    let window = now_secs / tier.window_seconds.max(1);
    let answer = update_shared(host, key, now_secs.saturating_mul(NANOS), |current| {
        let used = if read_u64(current, 0) == window && current.is_some() {
            read_u64(current, 8)
        } else {
            0
        };
        if used >= u64::from(tier.requests) {
            return (None, FreeTierAnswer::Exhausted);
        }
        let mut next = window.to_le_bytes().to_vec();
        next.extend_from_slice(&(used + 1).to_le_bytes());
        (
            Some(next),
            FreeTierAnswer::Free {
                remaining: u64::from(tier.requests) - used - 1,
            },
        )
    });
    // Without shared data the request is charged, never given away.
    answer.unwrap_or(FreeTierAnswer::Exhausted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::host::FakeHost;
    use crate::policy::FreeTierKey;

    fn limit(max_requests: u32, window_seconds: u64) -> RateLimit {
        RateLimit {
            max_requests,
            window_seconds,
            message: String::new(),
        }
    }

    #[test]
    fn a_bucket_allows_exactly_its_size_then_refills_evenly() {
        let mut host = FakeHost::default();
        let l = limit(3, 60);
        let now = 1_000 * NANOS;
        for _ in 0..3 {
            assert_eq!(take_token(&mut host, "k", &l, now), LimitAnswer::Allowed);
        }
        assert_eq!(
            take_token(&mut host, "k", &l, now),
            LimitAnswer::Denied {
                retry_after_seconds: 20
            }
        );
        // One token comes back every 20 s, not the whole bucket.
        let later = now + 20 * NANOS;
        assert_eq!(take_token(&mut host, "k", &l, later), LimitAnswer::Allowed);
        assert!(matches!(
            take_token(&mut host, "k", &l, later),
            LimitAnswer::Denied { .. }
        ));
        // Other keys have their own bucket.
        assert_eq!(take_token(&mut host, "k2", &l, now), LimitAnswer::Allowed);
    }

    #[test]
    fn a_lost_race_retries_on_the_winners_value() {
        let mut host = FakeHost::default();
        let l = limit(2, 60);
        // Another worker writes between our read and our write, once.
        host.shared_data_interference = Some(("k".into(), (NANOS * 30).to_le_bytes().to_vec()));
        let now = NANOS;
        assert_eq!(take_token(&mut host, "k", &l, now), LimitAnswer::Allowed);
        // The other worker's token (TAT 30 s) and ours: the bucket of 2 is empty.
        assert!(matches!(
            take_token(&mut host, "k", &l, now),
            LimitAnswer::Denied { .. }
        ));
    }

    #[test]
    fn keys_are_created_under_the_creation_lock_which_is_then_free() {
        let mut host = FakeHost::default();
        prepare(&mut host);
        let l = limit(2, 60);
        assert_eq!(take_token(&mut host, "k", &l, NANOS), LimitAnswer::Allowed);
        assert_eq!(host.shared_data[CREATE_LOCK].0, 0u64.to_le_bytes().to_vec());
        // A lock left behind by a VM that died expires; creation then still happens.
        host.shared_data.insert(
            CREATE_LOCK.into(),
            ((NANOS + CREATE_LOCK_NANOS).to_le_bytes().to_vec(), 999),
        );
        assert_eq!(take_token(&mut host, "k2", &l, NANOS), LimitAnswer::Allowed);
        assert!(host.shared_data.contains_key("k2"));
        assert_eq!(
            take_token(&mut host, "k3", &l, 2 * NANOS + CREATE_LOCK_NANOS),
            LimitAnswer::Allowed
        );
        assert_eq!(host.shared_data[CREATE_LOCK].0, 0u64.to_le_bytes().to_vec());
    }

    #[test]
    fn free_requests_are_counted_per_window() {
        let mut host = FakeHost::default();
        let tier = FreeTier {
            requests: 2,
            window_seconds: 100,
            per: FreeTierKey::Client,
        };
        assert_eq!(
            take_free(&mut host, "f", &tier, 1_000),
            FreeTierAnswer::Free { remaining: 1 }
        );
        assert_eq!(
            take_free(&mut host, "f", &tier, 1_050),
            FreeTierAnswer::Free { remaining: 0 }
        );
        assert_eq!(
            take_free(&mut host, "f", &tier, 1_099),
            FreeTierAnswer::Exhausted
        );
        assert_eq!(
            take_free(&mut host, "f", &tier, 1_100),
            FreeTierAnswer::Free { remaining: 1 }
        );
    }

    #[test]
    fn without_shared_data_nothing_is_given_away() {
        let mut host = FakeHost {
            shared_data_broken: true,
            ..FakeHost::default()
        };
        let tier = FreeTier {
            requests: 2,
            window_seconds: 100,
            per: FreeTierKey::Client,
        };
        assert_eq!(
            take_free(&mut host, "f", &tier, 1),
            FreeTierAnswer::Exhausted
        );
    }
}
