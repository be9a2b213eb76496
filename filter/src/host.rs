//! What the filter needs from Envoy, as a trait: the real implementation sits over
//! the proxy-wasm ABI ([`crate::abi`]), and [`FakeHost`] records calls for native
//! tests. Every method acts on the host's *effective* context, which the caller
//! selects with [`Host::set_effective_context`].

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// A gRPC callout could not even be started (unknown cluster, bad arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallFailed;

/// Why a shared-data write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedDataError {
    /// Another writer changed the value since it was read: read again and retry.
    CasMismatch,
    Failed,
}

/// Serializes header pairs as the proxy-wasm ABI writes them: count, (key len, value
/// len)*, then each key and value NUL-terminated. All lengths are little-endian u32.
pub fn serialize_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&len(k.len()));
        out.extend_from_slice(&len(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// A header map as the host serialized it ([`serialize_pairs`]'s format), read in
/// place: one host call fetches every request header, each lookup scans the bytes.
pub struct HeaderPairs(pub Vec<u8>);

impl HeaderPairs {
    /// The first value of `name` (compared ignoring ASCII case, as Envoy's lookups do).
    /// A buffer that does not follow the format yields `None`, never a panic.
    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.all(name).next()
    }

    /// Every value of `name`, in order: a header the client repeated is there once per
    /// line. Stops at anything that does not follow the format.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let buf = self.0.as_slice();
        let word = move |at: usize| -> Option<usize> {
            let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(bytes)).ok()
        };
        let count = word(0).unwrap_or(0);
        let mut text = count.checked_mul(8).and_then(|n| n.checked_add(4));
        (0..count)
            .map_while(move |i| {
                let at = text?;
                let key_len = word(4 + i * 8)?;
                let value_len = word(8 + i * 8)?;
                let key = buf.get(at..at.checked_add(key_len)?)?;
                let value_at = at.checked_add(key_len)?.checked_add(1)?;
                let value = buf.get(value_at..value_at.checked_add(value_len)?)?;
                text = value_at.checked_add(value_len)?.checked_add(1);
                Some((key, value))
            })
            .filter(move |(key, _)| key.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| value)
    }
}

pub trait Host {
    fn request_header(&self, name: &str) -> Option<String>;
    /// Every value of a request header the client sent more than once, in order.
    fn request_header_values(&self, name: &str) -> Vec<String>;
    fn response_header(&self, name: &str) -> Option<String>;
    /// A response trailer (only during the trailers callback).
    fn response_trailer(&self, name: &str) -> Option<String>;
    fn remove_request_header(&mut self, name: &str);
    /// Sets (replaces) a response header.
    fn set_response_header(&mut self, name: &str, value: &str);
    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8]);
    /// Answers a gRPC request with a trailers-only gRPC response: HTTP 200,
    /// `grpc-status`, `grpc-message` and `headers` as metadata.
    fn send_grpc_reply(&mut self, grpc_status: u32, headers: &[(String, String)], message: &str);
    /// Lets a paused request continue upstream.
    fn resume_request(&mut self);
    /// The first `size` bytes of the request body buffered so far.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Bytes of request body the host holds (all of it, where the filter buffered it).
    fn request_body_size(&self) -> Option<usize>;
    /// The response body chunk being delivered (`size` bytes).
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the first `size` bytes of the response body chunk being delivered.
    fn replace_response_body(&mut self, size: usize, bytes: &[u8]);
    /// Replaces the first `size` bytes of the request body chunk being delivered.
    fn replace_request_body(&mut self, size: usize, bytes: &[u8]);
    /// Resets the stream in both directions, upstream included. Envoy does it after
    /// the current callback returns, so the data of that callback is lost.
    fn close_stream(&mut self);
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Starts a unary gRPC call; returns its token.
    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u32,
        metadata: &[(String, String)],
    ) -> Result<u32, CallFailed>;
    /// Body of the gRPC response being delivered right now.
    fn grpc_response(&self, size: usize) -> Option<Vec<u8>>;
    fn set_effective_context(&mut self, context_id: u32) -> bool;
    fn now_nanos(&self) -> u64;
    fn random_bytes(&mut self, buf: &mut [u8]);
    fn log(&self, level: LogLevel, message: &str);
    fn define_counter(&mut self, name: &str) -> Option<u32>;
    fn increment_counter(&mut self, id: u32, by: u64);
    /// Value and CAS token of a key in the data shared by all VMs of this plugin's
    /// VM id (all worker threads of one Envoy); `None` when the key does not exist.
    fn get_shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `key` if its CAS token is still `cas` (0 writes unconditionally).
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: u32)
        -> Result<(), SharedDataError>;
    /// Stops the VM at once with a wasm trap; Envoy's `failure_policy` decides what
    /// follows. Only the test-only `debug_crash_on_header` switch calls it.
    fn trap(&mut self);
}

/// A recorded call on [`FakeHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    RemoveRequestHeader {
        context: u32,
        name: String,
    },
    SetResponseHeader {
        context: u32,
        name: String,
        value: String,
    },
    LocalReply {
        context: u32,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    GrpcReply {
        context: u32,
        grpc_status: u32,
        headers: Vec<(String, String)>,
        message: String,
    },
    Resume {
        context: u32,
    },
    ReplaceResponseBody {
        context: u32,
        size: usize,
        bytes: Vec<u8>,
    },
    ReplaceRequestBody {
        context: u32,
        size: usize,
        bytes: Vec<u8>,
    },
    CloseStream {
        context: u32,
    },
    Grpc {
        context: u32,
        token: u32,
        cluster: String,
        service: String,
        method: String,
        message: Vec<u8>,
        timeout_ms: u32,
        metadata: Vec<(String, String)>,
    },
}

/// Test double: request headers per context, recorded calls, a settable clock.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub effective: u32,
    pub headers: HashMap<u32, Vec<(String, String)>>,
    pub response_headers: HashMap<u32, Vec<(String, String)>>,
    pub response_trailers: HashMap<u32, Vec<(String, String)>>,
    pub properties: HashMap<(u32, String), Vec<u8>>,
    /// Property paths read, in order (e.g. `route_name`).
    pub property_reads: std::cell::RefCell<Vec<String>>,
    pub calls: Vec<Call>,
    pub now_nanos: u64,
    pub next_token: u32,
    /// When set, `grpc_call` fails to start.
    pub fail_grpc: bool,
    /// Body returned by `grpc_response`.
    pub grpc_body: Vec<u8>,
    pub counters: HashMap<String, u64>,
    pub counter_names: Vec<String>,
    pub logs: std::cell::RefCell<Vec<String>>,
    pub random_counter: u8,
    /// Request body per context, returned by `request_body`.
    pub request_bodies: HashMap<u32, Vec<u8>>,
    /// Response body chunk per context, returned by `response_body`.
    pub response_bodies: HashMap<u32, Vec<u8>>,
    /// Shared data: key -> (value, CAS token).
    pub shared_data: HashMap<String, (Vec<u8>, u32)>,
    pub shared_data_cas: u32,
    /// When set, the next CAS write to this key finds this value written by another
    /// worker first (once), as a lost race would.
    pub shared_data_interference: Option<(String, Vec<u8>)>,
    /// When set, shared-data writes fail.
    pub shared_data_broken: bool,
    /// Set by `trap` (the real host never returns from it).
    pub trapped: bool,
    /// Shared data as it was at each `resume_request`: what a VM trapping just after
    /// letting a request through leaves to the next one.
    pub shared_data_at_resume: Vec<HashMap<String, (Vec<u8>, u32)>>,
}

impl FakeHost {
    pub fn grpc_calls(&self) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|c| matches!(c, Call::Grpc { .. }))
            .collect()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

impl Host for FakeHost {
    fn request_header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get(&self.effective)
            .map(|headers| {
                headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        self.headers
            .get(&self.effective)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.response_headers
            .get(&self.effective)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn response_trailer(&self, name: &str) -> Option<String> {
        self.response_trailers
            .get(&self.effective)?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn remove_request_header(&mut self, name: &str) {
        if let Some(h) = self.headers.get_mut(&self.effective) {
            h.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
        self.calls.push(Call::RemoveRequestHeader {
            context: self.effective,
            name: name.to_owned(),
        });
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        self.calls.push(Call::SetResponseHeader {
            context: self.effective,
            name: name.to_owned(),
            value: value.to_owned(),
        });
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8]) {
        self.calls.push(Call::LocalReply {
            context: self.effective,
            status,
            headers: headers.to_vec(),
            body: body.to_vec(),
        });
    }

    fn send_grpc_reply(&mut self, grpc_status: u32, headers: &[(String, String)], message: &str) {
        self.calls.push(Call::GrpcReply {
            context: self.effective,
            grpc_status,
            headers: headers.to_vec(),
            message: message.to_owned(),
        });
    }

    fn resume_request(&mut self) {
        self.calls.push(Call::Resume {
            context: self.effective,
        });
        self.shared_data_at_resume.push(self.shared_data.clone());
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        let body = self.request_bodies.get(&self.effective)?;
        Some(body[..size.min(body.len())].to_vec())
    }

    fn request_body_size(&self) -> Option<usize> {
        Some(self.request_bodies.get(&self.effective).map_or(0, Vec::len))
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        let body = self.response_bodies.get(&self.effective)?;
        Some(body[..size.min(body.len())].to_vec())
    }

    fn replace_response_body(&mut self, size: usize, bytes: &[u8]) {
        self.calls.push(Call::ReplaceResponseBody {
            context: self.effective,
            size,
            bytes: bytes.to_vec(),
        });
    }

    fn replace_request_body(&mut self, size: usize, bytes: &[u8]) {
        self.calls.push(Call::ReplaceRequestBody {
            context: self.effective,
            size,
            bytes: bytes.to_vec(),
        });
    }

    fn close_stream(&mut self) {
        self.calls.push(Call::CloseStream {
            context: self.effective,
        });
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let path = path.join(".");
        let value = self
            .properties
            .get(&(self.effective, path.clone()))
            .cloned();
        self.property_reads.borrow_mut().push(path);
        value
    }

    fn grpc_call(
        &mut self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u32,
        metadata: &[(String, String)],
    ) -> Result<u32, CallFailed> {
        if self.fail_grpc {
            return Err(CallFailed);
        }
        self.next_token += 1;
        let token = self.next_token;
        self.calls.push(Call::Grpc {
            context: self.effective,
            token,
            cluster: cluster.to_owned(),
            service: service.to_owned(),
            method: method.to_owned(),
            message: message.to_vec(),
            timeout_ms,
            metadata: metadata.to_vec(),
        });
        Ok(token)
    }

    fn grpc_response(&self, _size: usize) -> Option<Vec<u8>> {
        Some(self.grpc_body.clone())
    }

    fn set_effective_context(&mut self, context_id: u32) -> bool {
        self.effective = context_id;
        true
    }

    fn now_nanos(&self) -> u64 {
        self.now_nanos
    }

    fn random_bytes(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            self.random_counter = self.random_counter.wrapping_add(1);
            *b = self.random_counter;
        }
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push(format!("{level:?}: {message}"));
    }

    fn define_counter(&mut self, name: &str) -> Option<u32> {
        self.counter_names.push(name.to_owned());
        u32::try_from(self.counter_names.len() - 1).ok()
    }

    fn increment_counter(&mut self, id: u32, by: u64) {
        if let Some(name) = self.counter_names.get(id as usize) {
            *self.counters.entry(name.clone()).or_default() += by;
        }
    }

    fn get_shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.shared_data.get(key).cloned()
    }

    fn set_shared_data(
        &mut self,
        key: &str,
        value: &[u8],
        cas: u32,
    ) -> Result<(), SharedDataError> {
        if self.shared_data_broken {
            return Err(SharedDataError::Failed);
        }
        if cas != 0 {
            if let Some((k, v)) = self.shared_data_interference.take_if(|(k, _)| k == key) {
                self.shared_data_cas += 1;
                self.shared_data.insert(k, (v, self.shared_data_cas));
            }
        }
        if let Some((_, current)) = self.shared_data.get(key) {
            if cas != 0 && cas != *current {
                return Err(SharedDataError::CasMismatch);
            }
        }
        self.shared_data_cas += 1;
        self.shared_data
            .insert(key.to_owned(), (value.to_vec(), self.shared_data_cas));
        Ok(())
    }

    fn trap(&mut self) {
        self.trapped = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> HeaderPairs {
        let owned: Vec<(String, String)> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HeaderPairs(serialize_pairs(&owned))
    }

    #[test]
    fn header_pairs_find_the_first_value_of_a_name_in_any_case() {
        let map = pairs(&[
            (":authority", "api.example"),
            (":path", "/v1/x"),
            ("payment-signature", "abc"),
            ("empty", ""),
            ("x-dup", "first"),
            ("x-dup", "second"),
        ]);
        assert_eq!(map.get(":authority"), Some(&b"api.example"[..]));
        assert_eq!(map.get(":path"), Some(&b"/v1/x"[..]));
        assert_eq!(map.get("Payment-Signature"), Some(&b"abc"[..]));
        assert_eq!(map.get("empty"), Some(&b""[..]));
        assert_eq!(map.get("x-dup"), Some(&b"first"[..]));
        assert_eq!(
            map.all("X-Dup").collect::<Vec<_>>(),
            [&b"first"[..], &b"second"[..]]
        );
        assert_eq!(map.all("x-payment").count(), 0);
        assert_eq!(map.get("x-payment"), None);
        assert_eq!(map.get(":pat"), None);
        assert_eq!(pairs(&[]).get(":path"), None);
    }

    #[test]
    fn header_pairs_that_break_the_format_find_nothing() {
        let whole = pairs(&[("a", "1"), ("b", "22")]).0;
        // Every cut of a valid buffer short of the last value's end (only its
        // terminating NUL may go), and lengths that point past the end.
        for cut in 0..whole.len() - 1 {
            let map = HeaderPairs(whole[..cut].to_vec());
            assert_ne!(map.get("b"), Some(&b"22"[..]), "cut at {cut}");
        }
        let mut huge = whole.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs(huge).get("zz"), None);
        let mut long_value = whole;
        long_value[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderPairs(long_value).get("b"), None);
        assert_eq!(HeaderPairs(Vec::new()).get("a"), None);
    }
}
