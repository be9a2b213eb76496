//! Metering a response while it streams, and ending it when the hold is spent.
//!
//! Meters whose units can be counted chunk by chunk — `per_kb` (bytes),
//! `per_second` (time since the request was let through), `per_token` with
//! `tokens_from: "sse_events"` (one per server-sent event) and `per_message`
//! (WebSocket messages) — are counted as the bytes pass. Once the next byte would
//! cost more than the hold, nothing more is forwarded:
//!
//! - a plain (chunked) body stops exactly at the budget;
//! - a server-sent-events stream stops after the last whole event within the budget,
//!   followed by a final `event: x402-budget-exhausted` saying why (the filter keeps
//!   an incomplete event back until its end arrives, so the client never sees half
//!   an event);
//! - a WebSocket connection gets a close frame (1008, "payment exhausted"): the
//!   client directly when the upstream's message is over budget, or, when the
//!   client's is, the upstream first, whose closing answer is replaced by ours.
//!
//! Then the stream is reset, which also stops the upstream. Envoy resets a stream
//! only after the callback that asked for it returns, dropping that callback's data,
//! so the reset is asked for in the next callback or tick, after the final bytes are
//! on their way. The capture is the cost of what was forwarded: at most the hold,
//! and exactly the hold when the stream ran to its budget.

use crate::pricing::{Meter, TokenSource, Unit, Usage};
use crate::websocket::{self, FrameScanner};

/// The SSE event that tells a client why its stream ended.
pub const EXHAUSTED_EVENT: &str = "x402-budget-exhausted";

/// Ticks to wait for the upstream to answer our close frame before resetting.
const CLOSE_GRACE_TICKS: u8 = 4;

/// What kind of response is streaming.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    #[default]
    Plain,
    /// `text/event-stream`: cut on event boundaries.
    Sse,
    /// Upgraded to WebSocket (status 101): frames in both directions.
    WebSocket,
}

/// Per-request streaming state of a metered response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    pub kind: Kind,
    /// SSE bytes held back until their event is complete.
    carry: Vec<u8>,
    /// The budget is spent: nothing more is forwarded.
    pub exhausted: bool,
    /// The final bytes went out; the stream is reset at the next chance.
    pub close_pending: bool,
    /// The reset was asked for.
    pub closed: bool,
    /// WebSocket: the close frame went to the client.
    close_sent_to_client: bool,
    /// Ticks since the budget ran out while waiting for the upstream's close.
    ticks_waiting: u8,
    client_frames: FrameScanner,
    upstream_frames: FrameScanner,
}

impl StreamState {
    /// A WebSocket is billed for what it used however it ended.
    pub fn settles_incomplete(&self) -> bool {
        self.kind == Kind::WebSocket
    }
}

/// What to do with one chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Forward these bytes instead of the chunk.
    pub replace: Option<Vec<u8>>,
    /// Reset the stream now (nothing of this chunk needs to reach the client).
    pub close_now: bool,
    /// Tell the request state machine the response ended (stream cut, or over).
    pub ended: bool,
}

/// Whether the meter counts while the response streams.
pub fn meters_while_streaming(meter: &Meter) -> bool {
    matches!(
        meter.unit,
        Unit::Kilobytes | Unit::Seconds | Unit::Messages(_) | Unit::Tokens(TokenSource::SseEvents)
    )
}

/// The budget in counting units (bytes, microseconds, events, messages).
pub fn budget(meter: &Meter) -> u64 {
    meter.max_units.saturating_mul(meter.unit.per())
}

/// Classifies the response from its headers.
pub fn on_response_headers(
    state: &mut StreamState,
    meter: &Meter,
    status: Option<u16>,
    content_type: Option<&str>,
) {
    let event_stream = content_type.is_some_and(|c| {
        c.trim_start()
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
    });
    state.kind = if status == Some(101) {
        Kind::WebSocket
    } else if event_stream || meter.unit == Unit::Tokens(TokenSource::SseEvents) {
        Kind::Sse
    } else {
        Kind::Plain
    };
}

/// The final SSE event after a cut.
pub fn exhausted_event(transaction: &str, held: u64) -> Vec<u8> {
    let data = serde_json::json!({
        "error": "budget_exhausted",
        "message": "the payment's maximum is spent: the stream ends here",
        "transaction": transaction,
        "amount": held.to_string(),
    });
    format!("event: {EXHAUSTED_EVENT}\ndata: {data}\n\n").into_bytes()
}

/// Splits SSE bytes into whole events and the incomplete rest: an event ends with
/// an empty line (`\n\n`, `\r\n\r\n`, or mixed).
fn split_events(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut events = Vec::new();
    let mut start = 0;
    let mut line_start = 0;
    for (i, b) in data.iter().enumerate() {
        if *b != b'\n' {
            continue;
        }
        let line = &data[line_start..i];
        if line.is_empty() || line == b"\r" {
            events.push(&data[start..=i]);
            start = i + 1;
        }
        line_start = i + 1;
    }
    (events, &data[start..])
}

/// Whether an SSE event costs a token: it has data, and that data is not `[DONE]`.
fn is_token_event(event: &[u8]) -> bool {
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            data.push(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    match data.as_slice() {
        [] => false,
        [only] => only.trim_ascii() != b"[DONE]",
        _ => true,
    }
}

/// What the next piece would cost in counting units, for byte and event meters.
fn piece_cost(meter: &Meter, piece: &[u8]) -> u64 {
    match meter.unit {
        Unit::Kilobytes => u64::try_from(piece.len()).unwrap_or(u64::MAX),
        Unit::Tokens(TokenSource::SseEvents) => u64::from(is_token_event(piece)),
        _ => 0,
    }
}

fn used(meter: &Meter, usage: &Usage) -> u64 {
    match meter.unit {
        Unit::Kilobytes => usage.bytes,
        Unit::Tokens(TokenSource::SseEvents) => usage.events,
        Unit::Messages(_) => usage.messages,
        _ => 0,
    }
}

fn record(meter: &Meter, usage: &mut Usage, piece: &[u8]) {
    if meter.unit == Unit::Tokens(TokenSource::SseEvents) && is_token_event(piece) {
        usage.events = usage.events.saturating_add(1);
    }
    usage.add_chunk(meter, piece);
}

/// The payment a stream runs on, for the final SSE event.
#[derive(Debug, Clone, Copy)]
pub struct Payment<'a> {
    pub transaction: &'a str,
    pub held: u64,
}

/// One response body chunk. `elapsed_micros` is the time since the request was let
/// through.
pub fn on_response_chunk(
    state: &mut StreamState,
    meter: &Meter,
    usage: &mut Usage,
    chunk: &[u8],
    end_of_stream: bool,
    elapsed_micros: u64,
    payment: Payment<'_>,
) -> Verdict {
    if state.kind == Kind::WebSocket {
        return on_upstream_frames(state, meter, usage, chunk, elapsed_micros);
    }
    if state.exhausted {
        // Past the cut: nothing more reaches the client, and the stream is reset.
        return drop_rest(state);
    }
    let limit = budget(meter);
    let mut data = std::mem::take(&mut state.carry);
    data.extend_from_slice(chunk);
    let out_of_time = meter.unit == Unit::Seconds && elapsed_micros >= limit;
    let mut forward = Vec::with_capacity(data.len());
    let mut cut = out_of_time && !data.is_empty();
    if !cut {
        let (pieces, rest): (Vec<&[u8]>, &[u8]) = match state.kind {
            Kind::Sse if !end_of_stream => {
                let (events, rest) = split_events(&data);
                // An event longer than the body limit is passed on as it is.
                if u64::try_from(rest.len()).unwrap_or(u64::MAX) > meter.max_response_body_bytes {
                    let mut all = events;
                    all.push(rest);
                    (all, &[])
                } else {
                    (events, rest)
                }
            }
            Kind::Sse => {
                let (mut events, rest) = split_events(&data);
                if !rest.is_empty() {
                    events.push(rest);
                }
                (events, &[])
            }
            _ => (vec![data.as_slice()], &[]),
        };
        for piece in pieces {
            let room = limit.saturating_sub(used(meter, usage));
            let cost = piece_cost(meter, piece);
            if cost <= room {
                record(meter, usage, piece);
                forward.extend_from_slice(piece);
                continue;
            }
            if state.kind == Kind::Plain && meter.unit == Unit::Kilobytes {
                // Bytes up to the budget exactly.
                let fits = usize::try_from(room).unwrap_or(usize::MAX).min(piece.len());
                record(meter, usage, &piece[..fits]);
                forward.extend_from_slice(&piece[..fits]);
            }
            cut = true;
            break;
        }
        if !cut {
            state.carry = rest.to_vec();
        }
    }
    if !cut {
        // Bytes, not lengths: what was held back from the last chunk and from this
        // one can be the same length, and then `forward` is not this chunk.
        let replace = (forward.as_slice() != chunk).then_some(forward);
        return Verdict {
            replace,
            close_now: false,
            ended: end_of_stream,
        };
    }
    state.exhausted = true;
    state.carry.clear();
    if state.kind == Kind::Sse {
        forward.extend_from_slice(&exhausted_event(payment.transaction, payment.held));
    }
    let nothing_to_flush = forward.is_empty();
    state.close_pending = !end_of_stream && !nothing_to_flush;
    state.closed = !end_of_stream && nothing_to_flush;
    Verdict {
        replace: Some(forward),
        close_now: state.closed,
        ended: true,
    }
}

/// Past the cut: the chunk is dropped, and the stream is reset the first time.
fn drop_rest(state: &mut StreamState) -> Verdict {
    let close_now = !state.closed;
    state.closed = true;
    Verdict {
        replace: Some(Vec::new()),
        close_now,
        ended: false,
    }
}

/// Upstream-to-client WebSocket bytes.
fn on_upstream_frames(
    state: &mut StreamState,
    meter: &Meter,
    usage: &mut Usage,
    chunk: &[u8],
    elapsed_micros: u64,
) -> Verdict {
    let frames = state.upstream_frames.scan(chunk);
    if state.close_sent_to_client {
        return drop_rest(state);
    }
    track_time(meter, usage, elapsed_micros);
    let counts = matches!(meter.unit, Unit::Messages(d) if d.counts_upstream());
    // Once the client's message was refused, the upstream's closing answer is
    // replaced by ours.
    let refused = state.exhausted;
    let Some(offset) = first_unpaid(frames, meter, usage, counts, elapsed_micros, refused) else {
        return Verdict::default();
    };
    state.exhausted = true;
    state.close_sent_to_client = true;
    state.close_pending = true;
    let mut forward = chunk[..offset].to_vec();
    forward.extend(websocket::close_frame_to_client(
        websocket::CLOSE_POLICY,
        websocket::CLOSE_REASON,
    ));
    Verdict {
        replace: Some(forward),
        close_now: false,
        ended: false,
    }
}

/// Counts the paid messages of `frames` (when `counts`) up to the first frame the
/// budget does not cover (once `refused`: the first close frame); its offset in the
/// chunk.
fn first_unpaid(
    frames: Vec<websocket::FrameStart>,
    meter: &Meter,
    usage: &mut Usage,
    counts: bool,
    elapsed_micros: u64,
    refused: bool,
) -> Option<usize> {
    let limit = budget(meter);
    for frame in frames {
        let over = if refused {
            frame.opcode == websocket::OPCODE_CLOSE
        } else if meter.unit == Unit::Seconds {
            elapsed_micros >= limit
        } else {
            counts && frame.starts_message() && usage.messages >= limit
        };
        if over {
            return Some(frame.offset);
        }
        if counts && frame.starts_message() {
            usage.messages = usage.messages.saturating_add(1);
        }
    }
    None
}

/// Client-to-upstream WebSocket bytes; `mask` masks a close frame to the upstream.
pub fn on_request_chunk(
    state: &mut StreamState,
    meter: &Meter,
    usage: &mut Usage,
    chunk: &[u8],
    elapsed_micros: u64,
    mask: [u8; 4],
) -> Verdict {
    if state.kind != Kind::WebSocket {
        return Verdict::default();
    }
    let frames = state.client_frames.scan(chunk);
    if state.exhausted {
        // Over budget: the client's frames go nowhere.
        return Verdict {
            replace: Some(Vec::new()),
            close_now: false,
            ended: false,
        };
    }
    track_time(meter, usage, elapsed_micros);
    let counts = matches!(meter.unit, Unit::Messages(d) if d.counts_client());
    let Some(offset) = first_unpaid(frames, meter, usage, counts, elapsed_micros, false) else {
        return Verdict::default();
    };
    state.exhausted = true;
    let mut forward = chunk[..offset].to_vec();
    forward.extend(websocket::close_frame_to_server(
        websocket::CLOSE_POLICY,
        websocket::CLOSE_REASON,
        mask,
    ));
    Verdict {
        replace: Some(forward),
        close_now: false,
        ended: false,
    }
}

/// Per-second WebSockets are billed for their time, up to the budget.
fn track_time(meter: &Meter, usage: &mut Usage, elapsed_micros: u64) {
    if meter.unit == Unit::Seconds {
        usage.upstream_micros = usage.upstream_micros.max(elapsed_micros.min(budget(meter)));
    }
}

/// A tick: `close_now` to reset the stream now; `ended` when a per-second response
/// ran out of time with no chunk to cut.
pub fn on_tick(state: &mut StreamState, meter: &Meter, usage: &mut Usage, elapsed: u64) -> Verdict {
    let reset = |state: &mut StreamState, ended: bool| {
        state.closed = true;
        Verdict {
            replace: None,
            close_now: true,
            ended,
        }
    };
    if state.closed {
        return Verdict::default();
    }
    if state.kind != Kind::WebSocket {
        if state.close_pending {
            return reset(state, false);
        }
        if meter.unit == Unit::Seconds && !state.exhausted && elapsed >= budget(meter) {
            state.exhausted = true;
            return reset(state, true);
        }
        return Verdict::default();
    }
    track_time(meter, usage, elapsed);
    if meter.unit == Unit::Seconds && elapsed >= budget(meter) {
        // Idle past its time: the next frame either way ends it, or a later reset.
        state.exhausted = true;
    }
    if state.close_pending {
        return reset(state, false);
    }
    if state.exhausted {
        // Waiting for the upstream to answer our close frame, a few ticks at most.
        state.ticks_waiting = state.ticks_waiting.saturating_add(1);
        if state.ticks_waiting >= CLOSE_GRACE_TICKS {
            return reset(state, false);
        }
    }
    Verdict::default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::decimal::UnitPrice;
    use crate::pricing::Direction;

    fn meter(unit: Unit, max_units: u64) -> Meter {
        let unit_price = UnitPrice::parse("0.001", 6).unwrap();
        let per = unit.per();
        Meter {
            max_amount: unit_price.amount_for(max_units * per, per).unwrap(),
            unit,
            unit_price,
            max_units,
            max_response_body_bytes: 1 << 20,
        }
    }

    fn chunk(
        state: &mut StreamState,
        meter: &Meter,
        usage: &mut Usage,
        data: &[u8],
        eos: bool,
    ) -> Verdict {
        let payment = Payment {
            transaction: "tx",
            held: meter.max_amount,
        };
        on_response_chunk(state, meter, usage, data, eos, 0, payment)
    }

    #[test]
    fn a_plain_body_stops_at_the_byte_budget_then_resets() {
        let m = meter(Unit::Kilobytes, 2);
        let mut state = StreamState::default();
        on_response_headers(&mut state, &m, Some(200), Some("application/octet-stream"));
        let mut usage = Usage::default();
        let v = chunk(&mut state, &m, &mut usage, &[b'x'; 1500], false);
        assert_eq!(v, Verdict::default());
        let v = chunk(&mut state, &m, &mut usage, &[b'y'; 1500], false);
        assert_eq!(v.replace, Some(vec![b'y'; 500]));
        assert!(v.ended && !v.close_now && state.close_pending);
        assert_eq!(usage.bytes, 2000);
        let v = chunk(&mut state, &m, &mut usage, b"more", false);
        assert_eq!(v.replace, Some(Vec::new()));
        assert!(v.close_now && !v.ended);
        assert_eq!(usage.bytes, 2000);
    }

    #[test]
    fn a_body_that_ends_within_budget_is_untouched() {
        let m = meter(Unit::Kilobytes, 2);
        let mut state = StreamState::default();
        let mut usage = Usage::default();
        let v = chunk(&mut state, &m, &mut usage, &[b'x'; 2000], true);
        assert_eq!(v.replace, None);
        assert!(v.ended && !state.exhausted);
    }

    #[test]
    fn an_event_stream_is_cut_after_the_last_paid_event_with_a_final_event() {
        let m = meter(Unit::Tokens(TokenSource::SseEvents), 2);
        let mut state = StreamState::default();
        on_response_headers(&mut state, &m, Some(200), Some("text/event-stream"));
        assert_eq!(state.kind, Kind::Sse);
        let mut usage = Usage::default();
        // An event split across chunks is held back until it is whole.
        let v = chunk(&mut state, &m, &mut usage, b"data: a\n\ndata: ", false);
        assert_eq!(v.replace, Some(b"data: a\n\n".to_vec()));
        let v = chunk(
            &mut state,
            &m,
            &mut usage,
            b"b\r\n\r\n: keepalive\n\n",
            false,
        );
        assert_eq!(v.replace, Some(b"data: b\r\n\r\n: keepalive\n\n".to_vec()));
        assert_eq!(usage.events, 2);
        let v = chunk(&mut state, &m, &mut usage, b"data: c\n\n", false);
        let text = String::from_utf8(v.replace.unwrap()).unwrap();
        assert!(
            text.starts_with("event: x402-budget-exhausted\ndata: {"),
            "{text}"
        );
        assert!(text.contains("\"budget_exhausted\"") && text.ends_with("\n\n"));
        assert_eq!(usage.events, 2);
        assert!(state.close_pending && v.ended);
    }

    /// Feeds `upstream` in `size`-byte chunks and returns what the client receives,
    /// applying each verdict as Envoy does: `replace` or else the chunk itself.
    fn deliver(m: &Meter, usage: &mut Usage, upstream: &[u8], size: usize) -> Vec<u8> {
        let mut state = StreamState::default();
        on_response_headers(&mut state, m, Some(200), Some("text/event-stream"));
        let chunks: Vec<&[u8]> = upstream.chunks(size).collect();
        let mut client = Vec::new();
        for (k, piece) in chunks.iter().enumerate() {
            let eos = k + 1 == chunks.len();
            match chunk(&mut state, m, usage, piece, eos).replace {
                Some(bytes) => client.extend(bytes),
                None => client.extend_from_slice(piece),
            }
        }
        client
    }

    #[test]
    fn held_back_bytes_of_equal_length_are_not_lost_or_repeated() {
        let m = meter(Unit::Tokens(TokenSource::SseEvents), 100);
        let short = "data: 1234567\n\n";
        let long = "data: 123456789012\n\n";
        assert_eq!((short.len(), long.len()), (15, 20));
        // In 20-byte chunks, 5 bytes are held back from every chunk after the first
        // and 5 released: the same length, different bytes.
        let upstream = format!("{short}{}", long.repeat(3));
        let mut usage = Usage::default();
        let client = deliver(&m, &mut usage, upstream.as_bytes(), 20);
        assert_eq!(
            String::from_utf8_lossy(&client),
            upstream,
            "the client gets the upstream's bytes exactly"
        );
        assert_eq!(usage.events, 4);
        for size in 1..=upstream.len() {
            let mut usage = Usage::default();
            let client = deliver(&m, &mut usage, upstream.as_bytes(), size);
            assert_eq!(client, upstream.as_bytes(), "{size}-byte chunks");
            assert_eq!(usage.events, 4, "{size}-byte chunks");
        }
    }

    #[test]
    fn the_done_marker_is_free_and_ends_the_stream_cleanly() {
        let m = meter(Unit::Tokens(TokenSource::SseEvents), 1);
        let mut state = StreamState::default();
        on_response_headers(&mut state, &m, Some(200), None);
        let mut usage = Usage::default();
        let v = chunk(&mut state, &m, &mut usage, b"data: a\n\n", false);
        assert_eq!(v.replace, None);
        let v = chunk(&mut state, &m, &mut usage, b"data: [DONE]\n\n", true);
        assert_eq!(v.replace, None);
        assert!(!state.exhausted && usage.events == 1);
    }

    #[test]
    fn per_kb_on_an_event_stream_cuts_on_an_event_boundary() {
        let m = meter(Unit::Kilobytes, 1);
        let mut state = StreamState::default();
        on_response_headers(
            &mut state,
            &m,
            Some(200),
            Some("text/event-stream; charset=utf-8"),
        );
        let mut usage = Usage::default();
        let event = format!("data: {}\n\n", "x".repeat(392));
        assert_eq!(event.len(), 400);
        let two = event.repeat(2);
        assert_eq!(
            chunk(&mut state, &m, &mut usage, two.as_bytes(), false).replace,
            None
        );
        let v = chunk(&mut state, &m, &mut usage, event.as_bytes(), false);
        let text = String::from_utf8(v.replace.unwrap()).unwrap();
        assert!(text.starts_with("event: x402-budget-exhausted"));
        assert_eq!(usage.bytes, 800);
    }

    const PAY: Payment<'static> = Payment {
        transaction: "tx",
        held: 1,
    };

    #[test]
    fn per_second_drops_what_arrives_after_the_time_budget() {
        let m = meter(Unit::Seconds, 1);
        let mut state = StreamState::default();
        let mut usage = Usage::default();
        let v = on_response_chunk(&mut state, &m, &mut usage, b"early", false, 500_000, PAY);
        assert_eq!(v, Verdict::default());
        let v = on_response_chunk(&mut state, &m, &mut usage, b"late", false, 1_000_000, PAY);
        assert_eq!(v.replace, Some(Vec::new()));
        assert!(v.close_now && v.ended);
    }

    fn ws_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![
            0x80 | opcode,
            (if masked { 0x80 } else { 0 }) | payload.len() as u8,
        ];
        if masked {
            out.extend_from_slice(&[0, 0, 0, 0]);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_websocket_over_budget_from_the_client_closes_through_the_upstream() {
        let m = meter(Unit::Messages(Direction::Client), 2);
        let mut state = StreamState::default();
        on_response_headers(&mut state, &m, Some(101), None);
        let mut usage = Usage::default();
        let text = websocket::OPCODE_TEXT;
        for _ in 0..2 {
            let v = on_request_chunk(
                &mut state,
                &m,
                &mut usage,
                &ws_frame(text, b"hi", true),
                0,
                [1; 4],
            );
            assert_eq!(v, Verdict::default());
            let echo = ws_frame(text, b"hi", false);
            assert_eq!(
                chunk(&mut state, &m, &mut usage, &echo, false),
                Verdict::default()
            );
        }
        assert_eq!(usage.messages, 2);
        let v = on_request_chunk(
            &mut state,
            &m,
            &mut usage,
            &ws_frame(text, b"3", true),
            0,
            [1; 4],
        );
        let to_upstream = v.replace.unwrap();
        assert_eq!(to_upstream[0], 0x88);
        assert_eq!(usage.messages, 2);
        // The upstream answers the close; the client gets ours.
        let mut answer = ws_frame(text, b"late", false);
        let at = answer.len();
        answer.extend(ws_frame(websocket::OPCODE_CLOSE, &[3, 232], false));
        let v = chunk(&mut state, &m, &mut usage, &answer, false);
        let to_client = v.replace.unwrap();
        assert_eq!(&to_client[..at], &answer[..at]);
        assert_eq!(
            &to_client[at..],
            websocket::close_frame_to_client(1008, "payment exhausted").as_slice()
        );
        assert!(on_tick(&mut state, &m, &mut usage, 0).close_now);
        assert!(state.settles_incomplete());
    }

    #[test]
    fn a_websocket_over_budget_from_the_upstream_closes_the_client_directly() {
        let m = meter(Unit::Messages(Direction::Upstream), 1);
        let mut state = StreamState::default();
        on_response_headers(&mut state, &m, Some(101), None);
        let mut usage = Usage::default();
        let mut two = ws_frame(websocket::OPCODE_BINARY, b"1", false);
        let at = two.len();
        two.extend(ws_frame(websocket::OPCODE_BINARY, b"2", false));
        let v = chunk(&mut state, &m, &mut usage, &two, false);
        let out = v.replace.unwrap();
        assert_eq!(&out[..at], &two[..at]);
        assert_eq!(out[at], 0x88);
        assert_eq!(usage.messages, 1);
        assert!(on_tick(&mut state, &m, &mut usage, 0).close_now);
        assert!(!on_tick(&mut state, &m, &mut usage, 0).close_now);
    }
}
