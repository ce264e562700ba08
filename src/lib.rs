//! hint-router: a proxy-wasm filter for Envoy that routes each request to a model-server
//! runner already holding the model its routing hint names.
//!
//! The same module runs in two roles, chosen by the plugin's `root_id`:
//!
//! * **filter** (any root id but [`POLLER_ROOT_ID`]): an HTTP filter on every worker. It reads
//!   the hint header, ranks runners with [`hint_router_core::rank`], and writes an ordered
//!   `ip:port,...` list that Envoy's `override_host` LB policy follows. It learns hints from
//!   runner responses and keeps the cross-worker in-flight counters.
//!   With root id [`QUEUE_ROOT_ID`] it fronts fal's queue (docs/queue.md).
//! * **poller** ([`POLLER_ROOT_ID`], run as a singleton `envoy.bootstrap.wasm` service): polls
//!   every runner's `/hints`, merges hints the workers saw in response headers (sent over a
//!   shared queue) and publishes the runner table to shared data.
//!
//! All decisions live in `hint-router-core`; this crate only talks to the host, through
//! [`host`], whose wrappers never panic.
#![deny(clippy::indexing_slicing)]
#![allow(clashing_extern_declarations)]

mod filter;
mod host;
mod poller;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

/// Root id that selects the poller role.
pub const POLLER_ROOT_ID: &str = "hint_router_poller";
/// Root id of a filter in front of fal's queue (docs/queue.md): job calls are steered by
/// their request id, submissions by their hint among queue-capable runners.
pub const QUEUE_ROOT_ID: &str = "hint_router_queue";
/// Shared-data key of the published runner table (JSON), whole.
pub(crate) const TABLE_KEY: &str = "hint_router.table";
/// Shared-data key of the published generations (`hint_router_core::table::delta::Generations`:
/// the newest, and that of the whole table); read on every request.
pub(crate) const GENERATION_KEY: &str = "hint_router.generation";
/// Shared-data keys of the ring of table deltas (`hint_router_core::table::delta`): this
/// prefix and the slot number, `0..RING`.
pub(crate) const DELTA_KEY_PREFIX: &str = "hint_router.table_delta.";

/// The shared-data key of delta ring slot `slot`.
pub(crate) fn delta_key(slot: u64) -> String {
    format!("{DELTA_KEY_PREFIX}{slot}")
}
/// Shared-data key of the in-flight value (`hint_router_core::inflight`): for `n` runners,
/// `2n` counters (the requests in flight to each runner, then those of them routed to wait
/// for a model load) and the pins (which models those requests use where).
pub(crate) const INFLIGHT_KEY: &str = "hint_router.inflight";
/// Shared queue over which workers send hints seen in response headers to the poller.
pub(crate) const QUEUE_NAME: &str = "hint_router.response_hints";

/// Rewrites the shared in-flight counters of `runners` runners (`2 * runners` values: in
/// flight, then loading): `edit` gets the decoded counts and returns whether to write them
/// back; the write is a compare-and-swap, retried with a fresh read up to `attempts` times on
/// a lost race. Pins are kept, but for runners left with nothing in flight. Returns whether
/// it wrote. The per-request increments use
/// `filter::State::adjust_counters` instead, which edits the bytes in place.
pub(crate) fn update_inflight(
    runners: usize,
    attempts: usize,
    mut edit: impl FnMut(&mut Vec<u32>) -> bool,
) -> bool {
    let mut counts = Vec::with_capacity(2 * runners);
    for _ in 0..attempts {
        let Ok((bytes, cas)) = host::get_shared(INFLIGHT_KEY) else { return false };
        let bytes = bytes.unwrap_or_default();
        hint_router_core::inflight::decode(&bytes, 2 * runners, &mut counts);
        if !edit(&mut counts) {
            return false;
        }
        let value = hint_router_core::inflight::encode_keeping(&counts, &bytes, runners);
        match host::set_shared(INFLIGHT_KEY, &value, cas) {
            Ok(()) => return true,
            Err(host::HostError::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
    false
}

proxy_wasm::main! {{
    host::init_logging();
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// The root context: unconfigured until `on_configure` picks the role.
#[derive(Default)]
enum Root {
    #[default]
    Unconfigured,
    Filter(filter::FilterRoot),
    Poller(Box<poller::PollerRoot>),
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if let Root::Poller(p) = self {
            p.on_http_call_response(token, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        host::refresh_log_level();
        let bytes = match host::get_buffer(host::Buffer::PluginConfiguration, size) {
            Ok(b) => b,
            Err(e) => {
                log::error!("hint-router: cannot read plugin configuration: {e}");
                return false;
            }
        };
        let cfg = match hint_router_core::config::Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        let root_id = host::get_property(&["plugin_root_id"]).ok().flatten().unwrap_or_default();
        let vm_id = host::get_property(&["plugin_vm_id"]).ok().flatten().unwrap_or_default();
        let vm_id = String::from_utf8_lossy(&vm_id).into_owned();
        if root_id == POLLER_ROOT_ID.as_bytes() {
            match poller::PollerRoot::new(cfg) {
                Ok(p) => *self = Root::Poller(Box::new(p)),
                Err(e) => {
                    log::error!("hint-router poller: {e}");
                    return false;
                }
            }
        } else {
            let queue_mode = root_id == QUEUE_ROOT_ID.as_bytes();
            *self = Root::Filter(filter::FilterRoot::new(cfg, vm_id, queue_mode));
        }
        true
    }

    fn on_tick(&mut self) {
        if let Root::Poller(p) = self {
            p.on_tick();
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Root::Poller(p) = self {
            p.on_queue_ready(queue_id);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match self {
            Root::Filter(f) => Some(Box::new(f.new_stream())),
            // A filter chain with an unconfigured or poller root: pass requests through.
            _ => Some(Box::new(filter::PassThrough)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
