//! The proxy-wasm ABI 0.2.1 edge: the functions Envoy calls (`proxy_on_*`), the host
//! functions the filter imports, and [`AbiHost`], the real [`Host`]. This is the only
//! module with `unsafe`; everything it does is move bytes across the boundary.
//!
//! All state lives in one [`Vm`] per wasm VM. A host call can re-enter the module
//! (Envoy may fail a gRPC call inline, inside `proxy_grpc_call`); such callbacks find
//! the VM busy, so their results are parked and handled when the outer callback
//! finishes.

use std::cell::RefCell;
use std::ptr::{null, null_mut};

use crate::host::{serialize_pairs, CallFailed, HeaderPairs, Host, LogLevel, SharedDataError};
use crate::plugin::{Action, Vm, TICK_PERIOD_MS};

// ABI enum values (proxy-wasm spec 0.2.1).
const STATUS_OK: u32 = 0;
const STATUS_CAS_MISMATCH: u32 = 8;
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_RESPONSE_TRAILERS: u32 = 3;
const BUFFER_HTTP_REQUEST_BODY: u32 = 0;
const BUFFER_HTTP_RESPONSE_BODY: u32 = 1;
const BUFFER_GRPC_RECEIVE: u32 = 5;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const STREAM_HTTP_REQUEST: u32 = 0;
const STREAM_HTTP_RESPONSE: u32 = 1;
const METRIC_COUNTER: u32 = 0;
const GRPC_UNKNOWN: u32 = 2;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_status(buffer_type: u32, length: *mut usize, flags: *mut u32) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_close_stream(stream_type: u32) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_data: *const u8,
        service_size: usize,
        method_data: *const u8,
        method_size: usize,
        metadata_data: *const u8,
        metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

extern "C" {
    fn __wasm_call_ctors();
}

/// Memory the host fills for us is allocated by us, through this export.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer: Box<[u8]> = vec![0u8; size].into_boxed_slice();
    Box::into_raw(buffer).cast::<u8>()
}

/// The first `size` bytes of one of the host's buffers.
fn buffer_bytes(buffer_type: u32, size: usize) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut len = 0;
    // SAFETY: out-pointers are valid locals.
    let status = unsafe { proxy_get_buffer_bytes(buffer_type, 0, size, &mut data, &mut len) };
    if status != STATUS_OK {
        return None;
    }
    Some(take_host_buffer(data, len).unwrap_or_default())
}

/// Takes ownership of a buffer the host allocated with `proxy_on_memory_allocate`.
fn take_host_buffer(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host returns memory it obtained from `proxy_on_memory_allocate(size)`,
    // i.e. a `Box<[u8]>` of exactly `size` bytes, and gives up ownership of it.
    let boxed = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(data, size)) };
    Some(boxed.into_vec())
}

/// The real host: every call goes through the imports above. It lives for one
/// callback from Envoy; the request headers it has read stay with it until the
/// filter removes one or acts on another context.
#[derive(Default)]
pub struct AbiHost {
    /// Every request header, fetched with one host call at the first read: a request
    /// reads 5-8 of them, and each read on its own is a host call and an allocation.
    request_headers: std::cell::OnceCell<Option<HeaderPairs>>,
}

impl AbiHost {
    fn request_headers(&self) -> Option<&HeaderPairs> {
        self.request_headers
            .get_or_init(|| {
                let mut data = null_mut();
                let mut size = 0;
                // SAFETY: out-pointers are valid locals.
                let status = unsafe {
                    proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &mut data, &mut size)
                };
                if status != STATUS_OK {
                    return None;
                }
                take_host_buffer(data, size).map(HeaderPairs)
            })
            .as_ref()
    }

    fn header(map_type: u32, name: &str) -> Option<String> {
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: key pointer/length describe a live str; out-pointers are valid locals.
        let status = unsafe {
            proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size)
        };
        if status != STATUS_OK {
            return None;
        }
        let bytes = take_host_buffer(data, size).unwrap_or_default();
        // A value that is not UTF-8 is still a value: hiding it would make a garbled
        // payment header look like no payment at all (402) instead of malformed (400).
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Host for AbiHost {
    fn request_header_values(&self, name: &str) -> Vec<String> {
        self.request_headers()
            .map(|pairs| {
                pairs
                    .all(name)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        let value = self.request_headers()?.get(name)?;
        // As `header`: a value that is not UTF-8 is still a value.
        Some(String::from_utf8_lossy(value).into_owned())
    }

    fn response_header(&self, name: &str) -> Option<String> {
        AbiHost::header(MAP_RESPONSE_HEADERS, name)
    }

    fn response_trailer(&self, name: &str) -> Option<String> {
        AbiHost::header(MAP_RESPONSE_TRAILERS, name)
    }

    fn remove_request_header(&mut self, name: &str) {
        self.request_headers.take();
        // SAFETY: pointer/length of a live str.
        unsafe { proxy_remove_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len()) };
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        // SAFETY: pointers/lengths of live strs.
        unsafe {
            proxy_replace_header_map_value(
                MAP_RESPONSE_HEADERS,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        };
    }

    fn send_local_reply(&mut self, status: u16, headers: &[(String, String)], body: &[u8]) {
        let headers = serialize_pairs(headers);
        let details = "x402";
        // SAFETY: every pointer/length pair describes a live buffer for the call's duration.
        unsafe {
            proxy_send_local_response(
                u32::from(status),
                details.as_ptr(),
                details.len(),
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                -1,
            )
        };
    }

    fn send_grpc_reply(&mut self, grpc_status: u32, headers: &[(String, String)], message: &str) {
        let headers = serialize_pairs(headers);
        let details = "x402";
        // Envoy answers a gRPC request's local reply as trailers-only (HTTP 200) with this
        // grpc-status and the body text as grpc-message; the HTTP code only matters when
        // no grpc-status is given.
        let grpc_status = i32::try_from(grpc_status).unwrap_or(2);
        // SAFETY: every pointer/length pair describes a live buffer for the call's duration.
        unsafe {
            proxy_send_local_response(
                200,
                details.as_ptr(),
                details.len(),
                message.as_ptr(),
                message.len(),
                headers.as_ptr(),
                headers.len(),
                grpc_status,
            )
        };
    }

    fn resume_request(&mut self) {
        // SAFETY: no pointers involved.
        unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) };
    }

    fn replace_response_body(&mut self, size: usize, bytes: &[u8]) {
        // SAFETY: the data pointer/length describe a live slice.
        unsafe {
            proxy_set_buffer_bytes(
                BUFFER_HTTP_RESPONSE_BODY,
                0,
                size,
                bytes.as_ptr(),
                bytes.len(),
            )
        };
    }

    fn replace_request_body(&mut self, size: usize, bytes: &[u8]) {
        // SAFETY: the data pointer/length describe a live slice.
        unsafe {
            proxy_set_buffer_bytes(
                BUFFER_HTTP_REQUEST_BODY,
                0,
                size,
                bytes.as_ptr(),
                bytes.len(),
            )
        };
    }

    fn close_stream(&mut self) {
        // SAFETY: no pointers involved.
        unsafe { proxy_close_stream(STREAM_HTTP_RESPONSE) };
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let joined = path.join("\0");
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: path pointer/length of a live String; out-pointers are valid locals.
        let status =
            unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) };
        if status != STATUS_OK {
            return None;
        }
        take_host_buffer(data, size)
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
        let metadata = serialize_pairs(metadata);
        let mut token = 0u32;
        // SAFETY: every pointer/length pair describes a live buffer; `token` is a valid local.
        let status = unsafe {
            proxy_grpc_call(
                cluster.as_ptr(),
                cluster.len(),
                service.as_ptr(),
                service.len(),
                method.as_ptr(),
                method.len(),
                metadata.as_ptr(),
                metadata.len(),
                if message.is_empty() {
                    null()
                } else {
                    message.as_ptr()
                },
                message.len(),
                timeout_ms,
                &mut token,
            )
        };
        if status == STATUS_OK {
            Ok(token)
        } else {
            Err(CallFailed)
        }
    }

    fn grpc_response(&self, size: usize) -> Option<Vec<u8>> {
        buffer_bytes(BUFFER_GRPC_RECEIVE, size)
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer_bytes(BUFFER_HTTP_REQUEST_BODY, size)
    }

    fn request_body_size(&self) -> Option<usize> {
        let mut length = 0usize;
        let mut flags = 0u32;
        // SAFETY: both pointers are to live locals the host writes once.
        let status =
            unsafe { proxy_get_buffer_status(BUFFER_HTTP_REQUEST_BODY, &mut length, &mut flags) };
        (status == STATUS_OK).then_some(length)
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        buffer_bytes(BUFFER_HTTP_RESPONSE_BODY, size)
    }

    fn set_effective_context(&mut self, context_id: u32) -> bool {
        self.request_headers.take();
        // SAFETY: no pointers involved.
        unsafe { proxy_set_effective_context(context_id) == STATUS_OK }
    }

    fn now_nanos(&self) -> u64 {
        let mut now = 0u64;
        // SAFETY: `now` is a valid local.
        unsafe { proxy_get_current_time_nanoseconds(&mut now) };
        now
    }

    fn random_bytes(&mut self, buf: &mut [u8]) {
        // SAFETY: pointer/length of a live mutable slice.
        let errno = unsafe { random_get(buf.as_mut_ptr(), buf.len()) };
        if errno != 0 {
            // Unique enough to keep request ids apart if the host has no randomness.
            let now = self.now_nanos().to_le_bytes();
            for (b, n) in buf.iter_mut().zip(now.iter().cycle()) {
                *b ^= *n;
            }
        }
    }

    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
        };
        // SAFETY: pointer/length of a live str.
        unsafe { proxy_log(level, message.as_ptr(), message.len()) };
    }

    fn define_counter(&mut self, name: &str) -> Option<u32> {
        let mut id = 0u32;
        // SAFETY: pointer/length of a live str; `id` is a valid local.
        let status =
            unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) };
        (status == STATUS_OK).then_some(id)
    }

    fn increment_counter(&mut self, id: u32, by: u64) {
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        // SAFETY: no pointers involved.
        unsafe { proxy_increment_metric(id, by) };
    }

    fn get_shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let mut data = null_mut();
        let mut size = 0;
        let mut cas = 0u32;
        // SAFETY: key pointer/length of a live str; out-pointers are valid locals.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        if status != STATUS_OK {
            // Not found (status 1): the key does not exist yet.
            return None;
        }
        Some((take_host_buffer(data, size).unwrap_or_default(), cas))
    }

    fn set_shared_data(
        &mut self,
        key: &str,
        value: &[u8],
        cas: u32,
    ) -> Result<(), SharedDataError> {
        // SAFETY: key and value pointer/length pairs describe live buffers.
        let status = unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match status {
            STATUS_OK => Ok(()),
            STATUS_CAS_MISMATCH => Err(SharedDataError::CasMismatch),
            _ => Err(SharedDataError::Failed),
        }
    }

    fn trap(&mut self) {
        core::arch::wasm32::unreachable()
    }
}

/// A gRPC token and its outcome, as [`Vm::on_grpc_result`] takes them.
type ParkedResult = (u32, Result<Vec<u8>, u32>);

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
    /// gRPC results that arrived while the VM was busy (re-entrant callbacks).
    static PARKED: RefCell<Vec<ParkedResult>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the VM, then any gRPC results parked meanwhile. Returns `busy` when
/// the VM is already in use further up the stack.
fn with_vm<R>(busy: R, f: impl FnOnce(&mut Vm, &mut AbiHost) -> R) -> R {
    VM.with(|cell| {
        let Ok(mut vm) = cell.try_borrow_mut() else {
            return busy;
        };
        let mut host = AbiHost::default();
        let result = f(&mut vm, &mut host);
        for _ in 0..64 {
            let parked = PARKED.with(|p| {
                p.try_borrow_mut()
                    .map(|mut p| std::mem::take(&mut *p))
                    .unwrap_or_default()
            });
            if parked.is_empty() {
                break;
            }
            for (token, outcome) in parked {
                // A fresh host: nothing read for the callback above carries over.
                vm.on_grpc_result(&mut AbiHost::default(), token, outcome);
            }
        }
        result
    })
}

fn on_grpc_result(token: u32, outcome: Result<Vec<u8>, u32>) {
    let handled = VM.with(|cell| cell.try_borrow_mut().is_ok());
    if handled {
        with_vm((), |vm, host| vm.on_grpc_result(host, token, outcome));
    } else {
        PARKED.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                p.push((token, outcome));
            }
        });
    }
}

fn action(a: Action) -> u32 {
    a as u32
}

/// Envoy calls this once after instantiation (wasip1 reactor convention).
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: runs the module's static constructors once, before any other export.
    unsafe { __wasm_call_ctors() };
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_context_id: u32) {
    with_vm((), |vm, _| {
        vm.on_context_create(context_id, root_context_id)
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_context_id: u32, configuration_size: usize) -> u32 {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: out-pointers are valid locals.
    let status = unsafe {
        proxy_get_buffer_bytes(
            BUFFER_PLUGIN_CONFIGURATION,
            0,
            configuration_size,
            &mut data,
            &mut size,
        )
    };
    let configuration = if status == STATUS_OK {
        take_host_buffer(data, size).unwrap_or_default()
    } else {
        Vec::new()
    };
    let ok = with_vm(false, |vm, host| {
        vm.on_configure(host, root_context_id, &configuration)
    });
    if ok {
        // SAFETY: no pointers involved.
        unsafe { proxy_set_tick_period_milliseconds(TICK_PERIOD_MS) };
    }
    u32::from(ok)
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_context_id: u32) {
    with_vm((), |vm, host| vm.on_tick(host, root_context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: u32,
) -> u32 {
    action(with_vm(Action::Continue, |vm, host| {
        vm.on_request_headers_with_body(host, context_id, end_of_stream == 0)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: u32,
) -> u32 {
    // For a body callback, `Pause` is StopIterationAndBuffer: Envoy keeps the body
    // and the next callback's size covers everything buffered so far.
    action(with_vm(Action::Continue, |vm, host| {
        vm.on_request_body(host, context_id, body_size, end_of_stream != 0)
    }))
}

/// Request trailers: Envoy lets a stream go on (held headers and body included) at
/// trailers a filter does not stop, so the module exports this callback and stops
/// them while it holds the request.
#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    let action = with_vm(Action::Continue, |vm, host| {
        vm.on_request_trailers(host, context_id)
    });
    // FilterTrailersStatus: Continue = 0, StopIteration = 1.
    u32::from(action != Action::Continue)
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: u32,
) -> u32 {
    action(with_vm(Action::Continue, |vm, host| {
        vm.on_response_headers(host, context_id, end_of_stream != 0)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: u32,
) -> u32 {
    action(with_vm(Action::Continue, |vm, host| {
        vm.on_response_body(host, context_id, body_size, end_of_stream != 0)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    action(with_vm(Action::Continue, |vm, host| {
        vm.on_response_trailers(host, context_id)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    with_vm((), |vm, host| vm.on_delete(host, context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(_context_id: u32, token: u32, response_size: usize) {
    // The receive buffer only exists during this callback: copy it out first.
    let body = AbiHost::default()
        .grpc_response(response_size)
        .unwrap_or_default();
    on_grpc_result(token, Ok(body));
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(_context_id: u32, token: u32, status_code: u32) {
    // After a received message the call is already settled and this is a no-op; a
    // close without a message fails the call (an OK status then counts as UNKNOWN).
    let status = if status_code == crate::dispatcher::GRPC_OK {
        GRPC_UNKNOWN
    } else {
        status_code
    };
    on_grpc_result(token, Err(status));
}
