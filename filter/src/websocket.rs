//! Just enough of the WebSocket framing (RFC 6455 §5.2) to bill a connection per
//! message: find where frames start in the bytes Envoy hands the filter after an
//! upgrade, and write the close frame that ends a connection whose hold is spent.
//! Payloads are never unmasked or copied; a frame header split across two chunks is
//! kept until it is complete.

/// Close code sent when the hold is spent: 1008, policy violation.
pub const CLOSE_POLICY: u16 = 1008;
/// Reason sent with [`CLOSE_POLICY`].
pub const CLOSE_REASON: &str = "payment exhausted";

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;

/// A frame whose header ended in the scanned chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameStart {
    /// Where the frame's first byte is in the chunk (0 when its header began in an
    /// earlier chunk).
    pub offset: usize,
    pub opcode: u8,
}

impl FrameStart {
    /// The first frame of a text or binary message: one message to count.
    pub fn starts_message(&self) -> bool {
        matches!(self.opcode, OPCODE_TEXT | OPCODE_BINARY)
    }
}

/// Where the stream of one direction is: inside a frame's payload, or reading a header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrameScanner {
    /// Header bytes of a frame seen so far (at most 14).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

/// The length of a frame header given its first two bytes.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(bytes)
        }
        n => u64::from(n),
    }
}

impl FrameScanner {
    /// Scans the next chunk of one direction; returns the frames whose headers it
    /// completed.
    pub fn scan(&mut self, chunk: &[u8]) -> Vec<FrameStart> {
        let mut frames = Vec::new();
        let mut at = 0usize;
        while at < chunk.len() {
            if self.payload_left > 0 {
                let left = usize::try_from(self.payload_left).unwrap_or(usize::MAX);
                let take = left.min(chunk.len() - at);
                at += take;
                self.payload_left -= u64::try_from(take).unwrap_or(self.payload_left);
                continue;
            }
            let start = at.saturating_sub(self.header.len());
            // Reads the header byte by byte: it is short, and may span chunks.
            self.header.push(chunk[at]);
            at += 1;
            if self.header.len() < 2 || self.header.len() < header_len(self.header[1]) {
                continue;
            }
            frames.push(FrameStart {
                offset: start,
                opcode: self.header[0] & 0x0f,
            });
            self.payload_left = payload_len(&self.header);
            self.header.clear();
        }
        frames
    }
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    // A control frame's payload is at most 125 bytes.
    let reason: String = reason.chars().take(100).collect();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// A close frame as a server sends it (unmasked), for the client.
pub fn close_frame_to_client(code: u16, reason: &str) -> Vec<u8> {
    let payload = close_payload(code, reason);
    let mut frame = vec![0x80 | OPCODE_CLOSE, payload.len() as u8];
    frame.extend_from_slice(&payload);
    frame
}

/// A close frame as a client sends it (masked with `mask`), for the upstream.
pub fn close_frame_to_server(code: u16, reason: &str, mask: [u8; 4]) -> Vec<u8> {
    let payload = close_payload(code, reason);
    let mut frame = vec![0x80 | OPCODE_CLOSE, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn finds_every_frame_start_in_one_chunk() {
        let mut bytes = frame(OPCODE_TEXT, b"hello", true);
        let second = bytes.len();
        bytes.extend(frame(OPCODE_BINARY, &[7u8; 300], false));
        let third = bytes.len();
        bytes.extend(frame(OPCODE_CLOSE, &[3, 232], true));
        let mut scanner = FrameScanner::default();
        assert_eq!(
            scanner.scan(&bytes),
            vec![
                FrameStart {
                    offset: 0,
                    opcode: OPCODE_TEXT
                },
                FrameStart {
                    offset: second,
                    opcode: OPCODE_BINARY
                },
                FrameStart {
                    offset: third,
                    opcode: OPCODE_CLOSE
                },
            ]
        );
    }

    #[test]
    fn follows_frames_across_chunks_byte_by_byte() {
        let mut bytes = frame(OPCODE_TEXT, &[b'a'; 70_000], true);
        bytes.extend(frame(OPCODE_CONTINUATION, b"x", true));
        bytes.extend(frame(OPCODE_TEXT, b"yz", false));
        let mut scanner = FrameScanner::default();
        let mut opcodes = Vec::new();
        for chunk in bytes.chunks(7) {
            opcodes.extend(scanner.scan(chunk).iter().map(|f| f.opcode));
        }
        assert_eq!(opcodes, vec![OPCODE_TEXT, OPCODE_CONTINUATION, OPCODE_TEXT]);
        let starts: Vec<bool> = [OPCODE_TEXT, OPCODE_CONTINUATION, OPCODE_BINARY]
            .iter()
            .map(|&opcode| FrameStart { offset: 0, opcode }.starts_message())
            .collect();
        assert_eq!(starts, vec![true, false, true]);
    }

    #[test]
    fn close_frames_carry_the_code_and_reason() {
        let to_client = close_frame_to_client(CLOSE_POLICY, CLOSE_REASON);
        assert_eq!(to_client[0], 0x88);
        assert_eq!(usize::from(to_client[1]), 2 + CLOSE_REASON.len());
        assert_eq!(&to_client[2..4], &1008u16.to_be_bytes());
        assert_eq!(&to_client[4..], CLOSE_REASON.as_bytes());

        let mask = [9, 8, 7, 6];
        let to_server = close_frame_to_server(CLOSE_POLICY, CLOSE_REASON, mask);
        assert_eq!(to_server[1], 0x80 | (2 + CLOSE_REASON.len()) as u8);
        let unmasked: Vec<u8> = to_server[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(unmasked, to_client[2..].to_vec());
        let mut scanner = FrameScanner::default();
        assert_eq!(scanner.scan(&to_server)[0].opcode, OPCODE_CLOSE);
    }
}
