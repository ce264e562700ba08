//! The cheapest useful wasm filter: reads one request header and continues. Built for
//! wasm32-wasip1 as `target/wasm32-wasip1/release/noop_filter.wasm`; the overhead benchmark
//! uses it as the floor that any proxy-wasm filter pays.
//!
//! With a plugin configuration `NAME=VALUE` it also sets request header `NAME` to `VALUE` on
//! every request: the benchmark uses that to steer requests like hint-router does
//! (`x-hint-router-pick=ip:port`), which measures what the steering costs Envoy natively.
#![allow(unsafe_code)]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::rc::Rc;

#[link(wasm_import_module = "env")]
extern "C" {
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
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot::default()));
}}

/// A header to set on every request.
type SetHeader = Option<Rc<(Vec<u8>, Vec<u8>)>>;

#[derive(Default)]
struct NoopRoot {
    set: SetHeader,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        if size == 0 {
            return true;
        }
        let (mut data, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid out-pointers; a returned buffer is owned by us (7 = plugin configuration).
        let cfg = unsafe {
            if proxy_get_buffer_bytes(7, 0, size, &mut data, &mut len) != 0 || data.is_null() {
                return false;
            }
            Vec::from_raw_parts(data, len, len)
        };
        let Some(eq) = cfg.iter().position(|&b| b == b'=') else { return false };
        let (name, value) = cfg.split_at(eq);
        self.set =
            Some(Rc::new((name.trim_ascii().to_vec(), value.get(1..).unwrap_or(&[]).trim_ascii().to_vec())));
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopStream { set: self.set.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopStream {
    set: SetHeader,
}

impl Context for NoopStream {}

impl HttpContext for NoopStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let name = "x-fal-runner-hint";
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid out-pointers; a returned buffer is owned by us and freed below.
        unsafe {
            if proxy_get_header_map_value(0, name.as_ptr(), name.len(), &mut data, &mut size) == 0
                && !data.is_null()
            {
                drop(Vec::from_raw_parts(data, size, size));
            }
        }
        if let Some(h) = &self.set {
            // SAFETY: pointers and lengths describe live slices.
            unsafe {
                proxy_replace_header_map_value(0, h.0.as_ptr(), h.0.len(), h.1.as_ptr(), h.1.len());
            }
        }
        Action::Continue
    }
}
