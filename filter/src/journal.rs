//! A copy, outside the VM, of the captures and voids a VM still owes settlement, so
//! that a VM that crashes does not take them with it.
//!
//! A capture is queued when its response has ended: the client already holds a receipt.
//! A VM that traps loses its memory, and `FAIL_RELOAD` starts a new, empty one; captures
//! still queued (or waiting for a retry, or in flight) would be lost and their holds
//! would expire, so the merchant would not be paid for responses the clients saw as
//! paid. The same goes for a configuration Envoy replaces (new prices through LDS or
//! ECDS): once its last request is gone, its root context is deleted with whatever it
//! still owes. Envoy's shared data lives outside the VMs and outlives a reload, so each
//! VM (each configuration in it) keeps there:
//!
//! - `<registry>`: the ids of the VMs that keep a journal (comma-separated);
//! - `<registry>.<id>`: the captures and voids that VM has not had answered yet, and
//!   its payments captured as they were placed whose requests have not ended
//!   ([`encode`]), rewritten whenever that set changes;
//! - `<registry>.<id>.beat`: when that VM last ticked.
//!
//! On every tick a VM beats, and takes over the journal of any listed VM that has not
//! beaten for [`ORPHAN_AFTER_NANOS`]: it unlists it (compare-and-swap, so one VM wins)
//! and queues its captures as its own. A VM taken for dead while it was only slow
//! lists itself again on its next tick; its captures and voids are then sent twice,
//! which settlement answers `ALREADY_RESOLVED` (a hold is resolved, and a payment
//! refunded by a void, at most once), so no one is charged or refunded twice.
//!
//! Envoy ends a crashed VM's requests with an error (those paused go no further, those
//! upstream lose their response), so a payment captured as it was placed is a payer
//! charged for nothing unless the request had ended. While its Authorize answer is
//! awaited the journal keeps the item: the VM that takes it over sends it again (its
//! request id makes settlement answer with the payment it placed, if any) and voids what
//! it finds. Once answered (rewritten before the request is let through), it keeps the
//! payment's refund, a void, until the request ends. A VM that only stalled past
//! [`ORPHAN_AFTER_NANOS`] may finish requests whose payments were refunded that way; it
//! logs an error when it finds its journal taken.

use std::cell::Cell;

use prost::Message;
use x402_proto::settlement::v1::{AuthorizeItem, CaptureItem, VoidItem};

use crate::host::{Host, LogLevel, SharedDataError};

/// A VM that has not ticked for this long is taken for gone. Ticks come every
/// [`crate::plugin::TICK_PERIOD_MS`]; the margin covers a worker that is busy for a while.
pub const ORPHAN_AFTER_NANOS: u64 = 5_000_000_000;
/// Most captures, and most voids, one journal keeps (the oldest, which expire first),
/// so one write stays small while settlement is down and they pile up.
pub const MAX_JOURNALED: usize = 512;
const REGISTRY_PREFIX: &str = "x402.capture_journals.";
/// Compare-and-swap attempts on the registry before leaving it to the next tick.
const MAX_ATTEMPTS: usize = 8;

#[derive(Debug, Clone)]
pub struct Journal {
    /// This VM's journal id, random per VM.
    id: String,
    /// The registry key; per settlement cluster, so captures are only ever taken over
    /// by a plugin that sends them to the same settlement.
    registry: String,
    /// This VM has listed itself in the registry.
    listed: Cell<bool>,
}

impl Journal {
    pub fn new(host: &mut dyn Host, settlement_cluster: &str) -> Journal {
        let mut random = [0u8; 8];
        host.random_bytes(&mut random);
        Journal {
            id: hex::encode(random),
            registry: format!("{REGISTRY_PREFIX}{settlement_cluster}"),
            listed: Cell::new(false),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn items_key(&self, id: &str) -> String {
        format!("{}.{id}", self.registry)
    }

    fn beat_key(&self, id: &str) -> String {
        format!("{}.{id}.beat", self.registry)
    }

    /// Records the captures and voids this VM still owes (queued, waiting to be
    /// resent, or in flight), and the Authorize items of its unanswered payments,
    /// replacing what was recorded before.
    pub fn record<'a>(
        &self,
        host: &mut dyn Host,
        captures: impl Iterator<Item = &'a CaptureItem>,
        voids: impl Iterator<Item = &'a VoidItem>,
        rechecks: impl Iterator<Item = &'a AuthorizeItem>,
    ) {
        let value = encode(
            captures.take(MAX_JOURNALED),
            voids.take(MAX_JOURNALED),
            rechecks.take(MAX_JOURNALED),
        );
        // A failed write (Envoy fails none without a compare-and-swap) would leave the
        // previous copy: a capture sent twice after a crash is answered ALREADY_RESOLVED,
        // but a payment whose request ended in between would be refunded.
        let _ = host.set_shared_data(&self.items_key(&self.id), &value, 0);
    }

    /// Once per tick: says this VM is alive, keeps it listed, and returns what VMs
    /// that stopped ticking owed, which this VM now owes.
    pub fn tick(&self, host: &mut dyn Host, now_nanos: u64) -> Vec<Owed> {
        let _ = host.set_shared_data(&self.beat_key(&self.id), &now_nanos.to_le_bytes(), 0);
        let (listed, relisted) = self.update_registry(host, &|ids| {
            if ids.contains(&self.id) {
                return false;
            }
            ids.push(self.id.clone());
            true
        });
        if relisted && self.listed.replace(true) {
            host.log(
                LogLevel::Error,
                "x402 filter: this VM did not tick for a while and another took over its journal: payments of its requests still going may have been refunded",
            );
        }
        let mut adopted = Vec::new();
        for other in listed.iter().filter(|id| **id != self.id) {
            let beat = host
                .get_shared_data(&self.beat_key(other))
                .and_then(|(bytes, _)| <[u8; 8]>::try_from(bytes.as_slice()).ok())
                .map(u64::from_le_bytes);
            if beat.is_some_and(|b| now_nanos.saturating_sub(b) < ORPHAN_AFTER_NANOS) {
                continue;
            }
            let (_, won) = self.update_registry(host, &|ids| {
                let before = ids.len();
                ids.retain(|id| id != other);
                ids.len() < before
            });
            if !won {
                // Another VM took it over first.
                continue;
            }
            let items_key = self.items_key(other);
            if let Some((bytes, _)) = host.get_shared_data(&items_key) {
                adopted.extend(decode(&bytes));
            }
            // Shared data has no delete: emptied, the keys of a gone VM stay tiny.
            let _ = host.set_shared_data(&items_key, &[], 0);
            let _ = host.set_shared_data(&self.beat_key(other), &[], 0);
        }
        adopted
    }

    /// Applies `change` to the registry with compare-and-swap; `change` says whether
    /// it changed anything. Returns the ids listed (as written, or as last read) and
    /// whether this call wrote a change.
    fn update_registry(
        &self,
        host: &mut dyn Host,
        change: &dyn Fn(&mut Vec<String>) -> bool,
    ) -> (Vec<String>, bool) {
        let mut ids = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let cas;
            (ids, cas) = match host.get_shared_data(&self.registry) {
                Some((bytes, cas)) => (parse_ids(&bytes), cas),
                None => (Vec::new(), 0),
            };
            if !change(&mut ids) {
                return (ids, false);
            }
            match host.set_shared_data(&self.registry, ids.join(",").as_bytes(), cas) {
                Ok(()) => return (ids, true),
                Err(SharedDataError::CasMismatch) => continue,
                Err(SharedDataError::Failed) => break,
            }
        }
        // Not written: a listing is tried again on the next tick, and a journal that
        // could not be unlisted is not taken over.
        (ids, false)
    }
}

/// A call a VM owes settlement: a capture of a response the client saw as paid, a
/// void (a payment captured at authorize whose upstream failed is refunded by it), or
/// an Authorize item to send again, whose payment (if placed) is then voided.
#[derive(Debug, Clone, PartialEq)]
pub enum Owed {
    Capture(CaptureItem),
    Void(VoidItem),
    Recheck(Box<AuthorizeItem>),
}

/// A void's record: this amount, and its transaction id and reason joined by
/// [`VOID_SEPARATOR`], a byte that never occurs in UTF-8. A module from before voids
/// were journaled cannot read that record, stops there, and keeps the captures, which
/// are written first.
const VOID_MARK: u64 = u64::MAX;
const VOID_SEPARATOR: u8 = 0xff;
/// An Authorize item's record: this amount, and as its id [`VOID_SEPARATOR`] then the
/// item's protobuf encoding. Written last; a module from before reads no further.
const RECHECK_MARK: u64 = u64::MAX - 1;

/// Captures and voids as bytes: per item the amount, upstream time (u64) and HTTP
/// status (u32), little-endian, then the transaction id's length (u16) and bytes.
/// Smaller in the module than a second protobuf decoder.
fn encode<'a>(
    captures: impl Iterator<Item = &'a CaptureItem>,
    voids: impl Iterator<Item = &'a VoidItem>,
    rechecks: impl Iterator<Item = &'a AuthorizeItem>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |amount: u64, micros: u64, status: u32, id: &[u8]| {
        let Ok(id_len) = u16::try_from(id.len()) else {
            return;
        };
        out.extend_from_slice(&amount.to_le_bytes());
        out.extend_from_slice(&micros.to_le_bytes());
        out.extend_from_slice(&status.to_le_bytes());
        out.extend_from_slice(&id_len.to_le_bytes());
        out.extend_from_slice(id);
    };
    for c in captures {
        let id = c.transaction_id.as_bytes();
        push(c.amount, c.upstream_micros, c.http_status, id);
    }
    for v in voids {
        let mut id = v.transaction_id.as_bytes().to_vec();
        id.push(VOID_SEPARATOR);
        id.extend_from_slice(v.reason.as_bytes());
        push(VOID_MARK, 0, 0, &id);
    }
    for item in rechecks {
        let mut id = vec![VOID_SEPARATOR];
        id.extend_from_slice(&item.encode_to_vec());
        push(RECHECK_MARK, 0, 0, &id);
    }
    out
}

/// What [`encode`] wrote; stops at anything that does not parse.
fn decode(mut bytes: &[u8]) -> Vec<Owed> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        *bytes = rest;
        Some(head)
    }
    fn u64_at(bytes: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(bytes, 8)?.try_into().ok()?))
    }
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let item = (|| {
            let amount = u64_at(&mut bytes)?;
            let upstream_micros = u64_at(&mut bytes)?;
            let http_status = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().ok()?);
            let len = u16::from_le_bytes(take(&mut bytes, 2)?.try_into().ok()?);
            let id = take(&mut bytes, usize::from(len))?;
            let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
            let void = id.iter().position(|&b| b == VOID_SEPARATOR);
            Some(match (amount, void) {
                (RECHECK_MARK, Some(0)) => {
                    Owed::Recheck(Box::new(AuthorizeItem::decode(id.get(1..)?).ok()?))
                }
                (VOID_MARK, Some(at)) => Owed::Void(VoidItem {
                    transaction_id: text(id.get(..at)?)?,
                    reason: text(id.get(at + 1..)?)?,
                }),
                _ => Owed::Capture(CaptureItem {
                    transaction_id: text(id)?,
                    amount,
                    upstream_micros,
                    http_status,
                }),
            })
        })();
        match item {
            Some(item) => items.push(item),
            None => break,
        }
    }
    items
}

fn parse_ids(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split(',')
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::host::FakeHost;

    const SECOND: u64 = 1_000_000_000;

    fn capture(id: &str) -> CaptureItem {
        CaptureItem {
            transaction_id: id.into(),
            amount: 10_000,
            upstream_micros: 12,
            http_status: 200,
        }
    }

    /// Records `captures` and `rechecks` (no voids) as `journal`'s whole journal.
    fn owe(
        journal: &Journal,
        host: &mut FakeHost,
        captures: &[CaptureItem],
        rechecks: &[AuthorizeItem],
    ) {
        journal.record(host, captures.iter(), std::iter::empty(), rechecks.iter());
    }

    fn owed(ids: &[&str]) -> Vec<Owed> {
        ids.iter().map(|id| Owed::Capture(capture(id))).collect()
    }

    const REGISTRY: &str = "x402.capture_journals.settlement";

    fn journal(host: &mut FakeHost) -> Journal {
        Journal::new(host, "settlement")
    }

    /// Two listed VMs; the first owes `tx-1` and will stop beating.
    fn crashed_and_survivor() -> (FakeHost, Journal, Journal) {
        let mut host = FakeHost::default();
        let crashed = journal(&mut host);
        let survivor = journal(&mut host);
        crashed.tick(&mut host, 0);
        survivor.tick(&mut host, 0);
        owe(&crashed, &mut host, &[capture("tx-1")], &[]);
        (host, crashed, survivor)
    }

    fn listed(host: &FakeHost) -> Vec<String> {
        parse_ids(&host.get_shared_data(REGISTRY).unwrap().0)
    }

    #[test]
    fn a_vm_that_stops_ticking_has_its_captures_taken_over_once() {
        let mut host = FakeHost::default();
        let crashed = journal(&mut host);
        let first = journal(&mut host);
        let second = journal(&mut host);
        assert_ne!(crashed.id(), first.id());
        let now = 100 * SECOND;
        assert!(crashed.tick(&mut host, now).is_empty());
        owe(
            &crashed,
            &mut host,
            &[capture("tx-1"), capture("tx-2")],
            &[],
        );
        assert!(first.tick(&mut host, now).is_empty());
        assert!(second.tick(&mut host, now).is_empty());

        // Alive: nothing is taken over, however often the others tick.
        let soon = now + ORPHAN_AFTER_NANOS - 1;
        assert!(first.tick(&mut host, soon).is_empty());

        // The crashed VM no longer ticks: the first VM to notice takes its captures,
        // the other gets nothing, and the journal is not taken over again.
        let later = now + ORPHAN_AFTER_NANOS;
        let taken = first.tick(&mut host, later);
        assert_eq!(taken, owed(&["tx-1", "tx-2"]));
        assert!(second.tick(&mut host, later).is_empty());
        assert!(first.tick(&mut host, later + SECOND).is_empty());
        let listed = listed(&host);
        assert!(!listed.contains(&crashed.id().to_owned()));
        assert!(listed.contains(&first.id().to_owned()));
        assert!(listed.contains(&second.id().to_owned()));
    }

    #[test]
    fn answered_items_leave_the_journal() {
        let mut host = FakeHost::default();
        let crashed = journal(&mut host);
        let survivor = journal(&mut host);
        crashed.tick(&mut host, 0);
        let captures = [capture("tx-1"), capture("tx-2")];
        owe(&crashed, &mut host, &captures, &[unanswered("req-1")]);
        owe(&crashed, &mut host, &captures[1..], &[unanswered("req-2")]);
        let taken = survivor.tick(&mut host, ORPHAN_AFTER_NANOS);
        let mut expected = owed(&["tx-2"]);
        expected.push(Owed::Recheck(Box::new(unanswered("req-2"))));
        assert_eq!(taken, expected);
    }

    #[test]
    fn a_vm_taken_for_gone_lists_itself_again() {
        let mut host = FakeHost::default();
        let slow = journal(&mut host);
        let other = journal(&mut host);
        slow.tick(&mut host, 0);
        owe(&slow, &mut host, &[capture("tx-1")], &[]);
        assert_eq!(other.tick(&mut host, ORPHAN_AFTER_NANOS).len(), 1);
        // Its next tick lists it again, and says what happened; its later captures can
        // be taken over again.
        assert!(host.logs.borrow().is_empty());
        slow.tick(&mut host, ORPHAN_AFTER_NANOS + 1);
        assert!(host.logs.borrow()[0].contains("another took over its journal"));
        owe(&slow, &mut host, &[capture("tx-3")], &[]);
        assert!(other.tick(&mut host, ORPHAN_AFTER_NANOS + 2).is_empty());
        assert_eq!(
            other.tick(&mut host, 2 * ORPHAN_AFTER_NANOS + 1),
            owed(&["tx-3"])
        );
    }

    #[test]
    fn a_lost_race_for_the_registry_takes_nothing_over() {
        let (mut host, crashed, survivor) = crashed_and_survivor();
        // Another VM unlists the crashed one between our read and our write.
        let winner = "0123456789abcdef";
        host.shared_data_interference = Some((
            REGISTRY.to_owned(),
            format!("{},{winner}", survivor.id()).into_bytes(),
        ));
        assert!(survivor.tick(&mut host, ORPHAN_AFTER_NANOS).is_empty());
        assert!(!listed(&host).contains(&crashed.id().to_owned()));
    }

    #[test]
    fn a_failed_registry_write_takes_nothing_over() {
        let (mut host, _crashed, survivor) = crashed_and_survivor();
        host.shared_data_broken = true;
        assert!(survivor.tick(&mut host, ORPHAN_AFTER_NANOS).is_empty());
        host.shared_data_broken = false;
        assert_eq!(
            survivor.tick(&mut host, ORPHAN_AFTER_NANOS),
            owed(&["tx-1"])
        );
    }

    fn unanswered(request_id: &str) -> AuthorizeItem {
        AuthorizeItem {
            request_id: request_id.into(),
            hold_amount: 10_000,
            route: "quote".into(),
            hold_ttl_seconds: 60,
            capture: true,
            proof: Some(x402_proto::settlement::v1::PaymentProof {
                nonce: "n-1".into(),
                amount: "10000".into(),
                signature: "c2lnbmF0dXJl".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn owed_items_read_back_as_written_and_garbage_reads_as_nothing() {
        // The second capture's amount is the void mark, but its id has no separator.
        let items = [
            capture("tx-1"),
            CaptureItem {
                transaction_id: "b5f7e1c2-0000-4000-8000-000000000000".into(),
                amount: u64::MAX,
                upstream_micros: 0,
                http_status: 404,
            },
        ];
        let voids = [VoidItem {
            transaction_id: "tx-9".into(),
            reason: "upstream_5xx".into(),
        }];
        let rechecks = [unanswered("req-1"), unanswered("req-2")];
        let bytes = encode(items.iter(), voids.iter(), rechecks.iter());
        let mut all: Vec<Owed> = items.iter().cloned().map(Owed::Capture).collect();
        all.push(Owed::Void(voids[0].clone()));
        all.extend(rechecks.iter().cloned().map(|r| Owed::Recheck(Box::new(r))));
        assert_eq!(decode(&bytes), all);
        // A reader from before voids were journaled (ids read as UTF-8) stops at the
        // void, after the captures; one from before payments were journaled stops at
        // the first of them (its id starts with a byte UTF-8 never has).
        let voids_only = encode(items.iter(), voids.iter(), std::iter::empty());
        let void_id = &voids_only[voids_only.len() - "tx-9".len() - 1 - "upstream_5xx".len()..];
        assert!(std::str::from_utf8(void_id).is_err());
        let recheck_id = &bytes[voids_only.len() + 8 + 8 + 4 + 2..];
        assert_eq!(recheck_id[0], VOID_SEPARATOR);
        // A truncated copy keeps the whole items before the cut.
        assert_eq!(decode(&bytes[..bytes.len() - 1]), all[..4].to_vec());
        assert_eq!(
            decode(&voids_only[..voids_only.len() - 1]),
            all[..2].to_vec()
        );
        assert!(decode(&[]).is_empty());
        assert!(decode(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn the_journal_is_bounded() {
        let mut host = FakeHost::default();
        let crashed = journal(&mut host);
        let survivor = journal(&mut host);
        crashed.tick(&mut host, 0);
        let many: Vec<CaptureItem> = (0..MAX_JOURNALED + 10)
            .map(|i| capture(&format!("tx-{i}")))
            .collect();
        owe(&crashed, &mut host, &many, &[]);
        let taken = survivor.tick(&mut host, ORPHAN_AFTER_NANOS);
        assert_eq!(taken.len(), MAX_JOURNALED);
        assert_eq!(taken[0], Owed::Capture(capture("tx-0")));
    }
}
