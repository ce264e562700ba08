//! The cheapest useful wasm filter: reads one request header and continues. Built for
//! wasm32-wasip1 as `target/wasm32-wasip1/release/noop_filter.wasm`; the overhead benchmark
//! uses it as the floor that any proxy-wasm filter pays.
#![allow(unsafe_code)]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_size: usize, data: *mut *mut u8, size: *mut usize) -> u32;
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot));
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopStream))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopStream;

impl Context for NoopStream {}

impl HttpContext for NoopStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let name = "x-fal-runner-hint";
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid out-pointers; a returned buffer is owned by us and freed below.
        unsafe {
            if proxy_get_header_map_value(0, name.as_ptr(), name.len(), &mut data, &mut size) == 0 && !data.is_null() {
                drop(Vec::from_raw_parts(data, size, size));
            }
        }
        Action::Continue
    }
}
