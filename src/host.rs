//! The thin adapter to the proxy-wasm ABI.
//!
//! The SDK's own `hostcalls` wrappers `panic!` on any status they do not expect, and its logger
//! unwraps. A panic aborts the VM (wasm is `panic=abort`), so every host call this filter makes
//! goes through these wrappers instead: each declares the raw import with a plain `u32` status
//! and maps every status to a [`HostError`] that the caller handles.

#![allow(unsafe_code)]

use std::fmt;
use std::ptr::null_mut;

/// A host call's non-OK status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// 1: the key, header or property does not exist.
    NotFound,
    /// 8: compare-and-swap lost a race.
    CasMismatch,
    /// Any other status (bad argument, unimplemented, internal failure...).
    Status(u32),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::NotFound => write!(f, "not found"),
            HostError::CasMismatch => write!(f, "cas mismatch"),
            HostError::Status(s) => write!(f, "host status {s}"),
        }
    }
}

type HostResult<T> = Result<T, HostError>;

fn check(status: u32) -> HostResult<()> {
    match status {
        0 => Ok(()),
        1 => Err(HostError::NotFound),
        8 => Err(HostError::CasMismatch),
        s => Err(HostError::Status(s)),
    }
}

/// Header maps used here (proxy-wasm `MapType` values).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Map {
    /// Downstream request headers.
    Request = 0,
    /// Upstream response headers.
    Response = 2,
    /// Headers of a `dispatch_http_call` response.
    CallResponse = 6,
}

/// Buffers used here (proxy-wasm `BufferType` values).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    /// Body of a `dispatch_http_call` response.
    CallResponseBody = 4,
    /// The plugin configuration.
    PluginConfiguration = 7,
}

/// Log levels (proxy-wasm values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Level {
    /// trace
    Trace = 0,
    /// debug
    Debug = 1,
    /// info
    Info = 2,
    /// warn
    Warn = 3,
    /// error
    Error = 4,
    /// critical (only written, for panics: the host's level is read as at most Error)
    Critical = 5,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_log_level(level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(path: *const u8, path_size: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_resolve_shared_queue(
        vm_id: *const u8,
        vm_id_size: usize,
        name: *const u8,
        name_size: usize,
        id: *mut u32,
    ) -> u32;
    fn proxy_dequeue_shared_queue(id: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_enqueue_shared_queue(id: u32, value: *const u8, value_size: usize) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

/// Takes ownership of a buffer the host allocated through `proxy_on_memory_allocate`.
///
/// # Safety
/// `data`/`size` must come from a host call that returned OK.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // The SDK's allocator hands out a boxed slice of exactly `size` bytes.
        Vec::from_raw_parts(data, size, size)
    }
}

/// Writes a log line; errors are ignored (there is nowhere to report them).
pub fn log(level: Level, msg: &str) {
    // SAFETY: pointer and length describe `msg`.
    let _ = unsafe { proxy_log(level as u32, msg.as_ptr(), msg.len()) };
}

/// The host's current log level (Info if it cannot be read).
pub fn log_level() -> Level {
    let mut l = 2u32;
    // SAFETY: `l` is a valid out-pointer.
    let st = unsafe { proxy_get_log_level(&mut l) };
    match (st, l) {
        (0, 0) => Level::Trace,
        (0, 1) => Level::Debug,
        (0, 3) => Level::Warn,
        (0, 4..) => Level::Error,
        _ => Level::Info,
    }
}

/// Milliseconds since the Unix epoch (0 if unavailable).
pub fn now_ms() -> u64 {
    let mut t = 0u64;
    // SAFETY: `t` is a valid out-pointer.
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        0 => t / 1_000_000,
        _ => 0,
    }
}

/// Nanoseconds since the Unix epoch, from the host's clock (0 if unavailable).
pub fn now_ns() -> u64 {
    let mut t = 0u64;
    // SAFETY: `t` is a valid out-pointer.
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        0 => t,
        _ => 0,
    }
}

/// Sets the root context's tick period.
pub fn set_tick_period_ms(ms: u32) -> HostResult<()> {
    // SAFETY: plain value argument.
    check(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Reads up to `max` bytes of a buffer.
pub fn get_buffer(kind: Buffer, max: usize) -> HostResult<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers are valid; on OK the host allocated `data`.
    unsafe {
        check(proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size))?;
        Ok(take(data, size))
    }
}

/// Reads one header's raw bytes (`None` if absent). Never assumes UTF-8.
pub fn get_header(map: Map, name: &str) -> HostResult<Option<Vec<u8>>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as above.
    unsafe {
        match check(proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)) {
            Ok(()) => Ok(Some(take(data, size))),
            Err(HostError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Sets (replaces) a header.
pub fn set_header(map: Map, name: &str, value: &[u8]) -> HostResult<()> {
    // SAFETY: pointers and lengths describe live slices.
    check(unsafe {
        proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

/// Removes a header (absent is fine).
pub fn remove_header(map: Map, name: &str) -> HostResult<()> {
    // SAFETY: as above.
    match check(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) }) {
        Err(HostError::NotFound) => Ok(()),
        r => r,
    }
}

/// Reads a property such as `["upstream", "address"]`.
pub fn get_property(path: &[&str]) -> HostResult<Option<Vec<u8>>> {
    let mut p = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            p.push(0);
        }
        p.extend_from_slice(part.as_bytes());
    }
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as above.
    unsafe {
        match check(proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size)) {
            Ok(()) => Ok(Some(take(data, size))),
            Err(HostError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Reads shared data: the value (None if the key is absent) and its CAS token.
pub fn get_shared(key: &str) -> HostResult<(Option<Vec<u8>>, u32)> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: as above.
    unsafe {
        match check(proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)) {
            Ok(()) => Ok((Some(take(data, size)), cas)),
            Err(HostError::NotFound) => Ok((None, 0)),
            Err(e) => Err(e),
        }
    }
}

/// Writes shared data; `cas` 0 writes unconditionally.
pub fn set_shared(key: &str, value: &[u8], cas: u32) -> HostResult<()> {
    // SAFETY: as above.
    check(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) })
}

/// Registers a shared queue owned by the calling root context.
pub fn register_queue(name: &str) -> HostResult<u32> {
    let mut id = 0u32;
    // SAFETY: as above.
    check(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Finds a queue another VM registered.
pub fn resolve_queue(vm_id: &str, name: &str) -> HostResult<u32> {
    let mut id = 0u32;
    // SAFETY: as above.
    check(unsafe {
        proxy_resolve_shared_queue(vm_id.as_ptr(), vm_id.len(), name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

/// Takes the next message from a queue (`None` when empty).
pub fn dequeue(id: u32) -> HostResult<Option<Vec<u8>>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as above.
    unsafe {
        match check(proxy_dequeue_shared_queue(id, &mut data, &mut size)) {
            Ok(()) => Ok(Some(take(data, size))),
            Err(HostError::Status(7)) | Err(HostError::NotFound) => Ok(None), // 7 = Empty
            Err(e) => Err(e),
        }
    }
}

/// Appends a message to a queue.
pub fn enqueue(id: u32, value: &[u8]) -> HostResult<()> {
    // SAFETY: as above.
    check(unsafe { proxy_enqueue_shared_queue(id, value.as_ptr(), value.len()) })
}

/// Metric kinds.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum MetricKind {
    /// Monotonic counter.
    Counter = 0,
    /// Gauge.
    Gauge = 1,
}

/// Defines (or finds) a metric.
pub fn define_metric(kind: MetricKind, name: &str) -> HostResult<u32> {
    let mut id = 0u32;
    // SAFETY: as above.
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Adds to a counter or gauge (errors ignored: stats never fail a request).
pub fn increment_metric(id: u32, by: i64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_increment_metric(id, by) };
}

/// Sets a gauge (errors ignored).
pub fn record_metric(id: u32, value: u64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// A `log` backend writing to Envoy's log through [`log`] (no unwrap, unlike the SDK's).
pub struct HostLogger;

impl ::log::Log for HostLogger {
    fn enabled(&self, m: &::log::Metadata) -> bool {
        m.level() <= ::log::max_level()
    }

    fn log(&self, r: &::log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            ::log::Level::Error => Level::Error,
            ::log::Level::Warn => Level::Warn,
            ::log::Level::Info => Level::Info,
            ::log::Level::Debug => Level::Debug,
            ::log::Level::Trace => Level::Trace,
        };
        log(level, &r.args().to_string());
    }

    fn flush(&self) {}
}

/// Installs [`HostLogger`] (at Info: the host's level cannot be read during `_initialize`),
/// and a panic hook that writes the panic to Envoy's log at critical before the VM aborts
/// (no panic is known to be reachable; if one is, the log says where).
pub fn init_logging() {
    static LOGGER: HostLogger = HostLogger;
    let _ = ::log::set_logger(&LOGGER);
    ::log::set_max_level(::log::LevelFilter::Info);
    std::panic::set_hook(Box::new(|info| {
        log(Level::Critical, &format!("hint-router: panic, the VM aborts: {info}"));
    }));
}

/// Sends an HTTP call through `cluster` (the poller's `/hints` polls) and returns its token.
///
/// This one goes through the SDK's `hostcalls::dispatch_http_call`, because the SDK must
/// register the token for the response to reach this root context (its dispatcher
/// `expect`s every response token to be registered, and registering is private to the SDK).
/// The SDK wrapper panics only on a status other than `Ok`, `BadArgument` and
/// `InternalFailure` (proxy-wasm 0.2.5, `src/hostcalls.rs` line 841, `status => panic!`).
/// That panic is unreachable: Envoy's `Context::httpCall`
/// (`source/extensions/common/wasm/context.cc`) returns only `BadArgument` (negative timeout,
/// unknown cluster, missing `:path`/`:method`/`:authority`), `InternalFailure` (the async
/// client refused) or `Ok`; the ABI wrapper in front of it (proxy-wasm-cpp-host `http_call`)
/// adds only `InvalidMemoryAccess`, for pointers outside the VM's memory, and the SDK passes
/// pointers to live buffers (the serialised headers and trailers; no body is `(null, 0)`, an
/// empty range inside memory). The timeout is below `u32::MAX` ms by config validation
/// (`poll_timeout_ms` <= 3,600,000), so it is never negative on the host side.
pub fn dispatch_http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    timeout: std::time::Duration,
) -> HostResult<u32> {
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout)
        .map_err(|s| HostError::Status(s as u32))
}

/// Serialises a header map the way the proxy-wasm ABI reads one: the pair count, each pair's
/// key and value lengths, then each key and value followed by a NUL (all `u32` little-endian).
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + 8 * headers.len() + bytes);
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len32(headers.len()));
    for (k, v) in headers {
        out.extend_from_slice(&len32(k.len()));
        out.extend_from_slice(&len32(v.len()));
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Answers the current request from the filter (Envoy's local reply): nothing goes upstream.
/// The caller returns `Action::Pause` from the headers callback afterwards.
pub fn send_local_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
    let map = serialize_headers(headers);
    let details = b"hint_router";
    // SAFETY: every pointer/length pair describes a live slice.
    check(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// Follows the host's current log level, so disabled levels cost nothing.
pub fn refresh_log_level() {
    ::log::set_max_level(match log_level() {
        Level::Trace => ::log::LevelFilter::Trace,
        Level::Debug => ::log::LevelFilter::Debug,
        Level::Info => ::log::LevelFilter::Info,
        Level::Warn => ::log::LevelFilter::Warn,
        Level::Error | Level::Critical => ::log::LevelFilter::Error,
    });
}
