//! The HTTP API, as an [`axum::Router`] over a [`Runner`].
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /` `{"model": M, "prompt": P}` | 200 `{"model", "output", "cache", "queue_ms", "slot_ms", "load_ms", "infer_ms"}` and `x-cache: hit\|miss` |
//! | `GET /hints` | 200 [`HintsReport`](hint_router_core::wire::HintsReport); hints most recently used first |
//! | `GET /healthz`, `GET /health` | 200 `ok`, or 503 `draining` (`/health` is the path fal apps serve, which the shipped Envoy health check uses) |
//! | `POST /queue/submit` (or `/queue/submit/`) with the body of `POST /` | 200 `{"request_id", "response_url", "status_url", "cancel_url", "status": "IN_QUEUE", "queue_position"}`: a job of the fal queue, run like `POST /` |
//! | `GET /queue/requests/{id}/status[?logs=1]` | 200 `{"status": "IN_QUEUE"\|"IN_PROGRESS"\|"COMPLETED", ...}` |
//! | `GET /queue/requests/{id}` | the job's answer, as `POST /` would have given it, once completed; 400 `{"detail"}` before, or when cancelled |
//! | `PUT /queue/requests/{id}/cancel` | 200 `{"status": "OK"}` (was queued), 202 `CANCELLATION_REQUESTED` (runs on), 400 `ALREADY_COMPLETED`, 404 `NOT_FOUND` |
//!
//! The `/queue` routes follow docs/queue.md (they are what Envoy's queue listener sends on for
//! fal's queue paths); without [`RunnerConfig::queue`](crate::runner::RunnerConfig::queue)
//! (`--no-queue`) they are unknown paths. A submit is admitted, and its body checked, exactly
//! like `POST /` (429, 400 and 413 alike, nothing queued); a draining runner refuses it with
//! 503, `retry-after: 1` and [`OVERLOADED_HEADER`]`: draining`, since its jobs' results would
//! go with it. Unknown request ids answer 404 `{"detail": "Request not found"}`.
//!
//! Errors are JSON `{"error": "..."}`: 400 for a body that is not the JSON above or a bad
//! model name, 404 for an unknown path or a model the backend does not know, 405 for a wrong
//! method, 413 for a body over [`MAX_BODY_BYTES`], 503 for a model that failed to load
//! (with `retry-after`; a missing weights file is a 404, a corrupt one a 503), 507 for a
//! model bigger than the whole memory budget, 500 for a failed inference, and 429 with
//! `retry-after: 1` and [`OVERLOADED_HEADER`]`: queue-full` when `max_concurrency +
//! max_queue` requests are in progress already: answered at once, before the body is read,
//! and nothing was run, so a router may send the request to another runner.
//!
//! `GET /hints` also reports, beside the core fields, `max_queue`, `running` (inferences
//! running now), `queued` (requests in progress but not running: waiting for a load or a
//! slot), `refused_total` (requests answered 429 so far) and `connections_refused_total`
//! (connections closed unread over `max_connections`); routers ignore fields they do not
//! know.
//!
//! Every response, errors included, carries `x-runner-in-flight` (requests and queued jobs
//! in progress, the one answered excluded), `x-runner-id` (the advertised address) and
//! `x-fal-runner-hints` (the advertised hints, as in `/hints`), computed after the request's
//! own work: a miss's response already lists its model.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hint_router_core::hint::is_hint_byte;
use hint_router_core::wire::{
    format_hints_header, CACHE_HEADER, RUNNER_HINTS_HEADER, RUNNER_ID_HEADER, RUNNER_INFER_MS_HEADER,
    RUNNER_IN_FLIGHT_HEADER, RUNNER_LOAD_MS_HEADER,
};
use serde::{Deserialize, Serialize};

use crate::backend::BackendError;
use crate::runner::{InferError, Inference, Runner};

/// Largest request body accepted, in bytes (1 MiB); larger ones get 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Response header of a refusal that ran nothing (429, or 503 for a queue submission to a
/// draining runner): routers retry such a request on another runner at once. Its value says
/// why: `queue-full` or `draining`.
pub const OVERLOADED_HEADER: &str = "x-runner-overloaded";

/// Longest model name accepted, in bytes.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

const RUNNER_ID: HeaderName = HeaderName::from_static(RUNNER_ID_HEADER);
const RUNNER_HINTS: HeaderName = HeaderName::from_static(RUNNER_HINTS_HEADER);
const CACHE: HeaderName = HeaderName::from_static(CACHE_HEADER);
const RUNNER_IN_FLIGHT: HeaderName = HeaderName::from_static(RUNNER_IN_FLIGHT_HEADER);
const INFER_MS: HeaderName = HeaderName::from_static(RUNNER_INFER_MS_HEADER);
const LOAD_MS: HeaderName = HeaderName::from_static(RUNNER_LOAD_MS_HEADER);

/// Body of `POST /`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct InferRequest {
    /// The model to run.
    pub model: String,
    /// The input; empty when absent.
    #[serde(default)]
    pub prompt: String,
    /// The model to evict if room must be made (the [`EVICT_HEADER`] request header, not
    /// part of the body).
    #[serde(skip)]
    pub evict: Option<String>,
}

/// Request header naming the model hint-router asks the runner to evict if it has to make
/// room for the requested one: the cheapest to lose fleet-wide (a copy another runner also
/// holds, or the least popular). Advice only: ignored when absent, not a valid model name,
/// not resident, in use or loading; the runner then evicts its least recently used model.
pub const EVICT_HEADER: &str = "x-hint-router-evict";

/// Body of a successful `POST /`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct InferResponse {
    /// The model that ran.
    pub model: String,
    /// What it answered.
    pub output: String,
    /// `hit` when the model was resident on arrival, else `miss`.
    pub cache: String,
    /// Milliseconds spent waiting for a cache slot and an inference slot.
    pub queue_ms: u64,
    /// Of `queue_ms`, the milliseconds spent waiting for an inference slot.
    pub slot_ms: u64,
    /// Milliseconds spent waiting for the model to load.
    pub load_ms: u64,
    /// Milliseconds the inference took.
    pub infer_ms: u64,
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
}

/// An answer to an inference: what `POST /` sends, and what a queued job records as its
/// result. Every error answer is one too.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// Its own headers (`content-type`, `x-cache`, `retry-after`...); the runner's headers
    /// are added to every response on its way out.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// A JSON answer; serialising our own types does not fail, but if it did the answer is a
    /// plain 500.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Self {
        let mut headers = HeaderMap::new();
        match serde_json::to_vec(body) {
            Ok(body) => {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Self { status, headers, body: Bytes::from(body) }
            }
            Err(e) => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                headers,
                body: Bytes::from(format!("cannot serialise the answer: {e}")),
            },
        }
    }

    /// An error answer: `{"error": message}`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::json(status, &ErrorBody { error: message.into() })
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.status, self.headers, self.body).into_response()
    }
}

/// Checks a model name: 1 to [`MAX_MODEL_NAME_BYTES`] bytes of visible ASCII
/// (0x21..=0x7E) other than `,` — exactly what a hint header can carry.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("model name is empty".to_string());
    }
    if name.len() > MAX_MODEL_NAME_BYTES {
        return Err(format!(
            "model name is {} bytes long, over the limit of {MAX_MODEL_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(bad) = name.bytes().find(|&b| !is_hint_byte(b)) {
        return Err(format!("model name has byte 0x{bad:02x}; only visible ASCII other than ',' is allowed"));
    }
    Ok(())
}

/// The runner's HTTP API.
pub fn router(runner: Runner) -> Router {
    let routes = Router::new()
        .route("/", post(infer))
        .route("/hints", get(hints))
        .route("/healthz", get(healthz))
        .route("/health", get(healthz));
    let routes = if runner.queue().is_some() { routes.merge(crate::queue::routes::routes()) } else { routes };
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(runner.clone(), runner_headers))
        .with_state(runner)
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    Answer::error(status, message).into_response()
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn infer(State(runner): State<Runner>, request: Request) -> Response {
    // Let in (or refuse) before reading the body: a full runner holds no more bodies.
    let admission = match runner.admit() {
        Ok(admission) => admission,
        Err(e) => return infer_error(&e).into_response(),
    };
    let request = match read_request(request).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let evict = request.evict.as_deref();
    let result = runner.infer_admitted(admission, &request.model, evict, request.prompt).await;
    inference_answer(request.model, result).into_response()
}

/// Reads and checks the body of `POST /` (a submission's too): the error answer when it is
/// too large, not the JSON of [`InferRequest`], or names a bad model.
pub(crate) async fn read_request(request: Request) -> Result<InferRequest, Response> {
    let evict = request
        .headers()
        .get(EVICT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|name| validate_model_name(name).is_ok())
        .map(str::to_string);
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) => return Err(error(rejection.status(), rejection.body_text())),
    };
    let mut request: InferRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}"))),
    };
    if let Err(e) = validate_model_name(&request.model) {
        return Err(error(StatusCode::BAD_REQUEST, e));
    }
    request.evict = evict;
    Ok(request)
}

/// The answer to an inference of `model`, as `POST /` gives it.
pub(crate) fn inference_answer(model: String, result: Result<Inference, InferError>) -> Answer {
    match result {
        Ok(done) => {
            let cache = done.cache.as_str();
            let body = InferResponse {
                model,
                output: done.output,
                cache: cache.to_string(),
                queue_ms: millis(done.queue),
                slot_ms: millis(done.slot_wait),
                load_ms: millis(done.load),
                infer_ms: millis(done.infer),
            };
            let mut answer = Answer::json(StatusCode::OK, &body);
            answer.headers.insert(CACHE, HeaderValue::from_static(cache));
            // The runner's own times, for routers that cannot time the request themselves (a
            // queued job's answer comes long after its submission was answered).
            answer.headers.insert(INFER_MS, HeaderValue::from(body.infer_ms));
            if done.load > std::time::Duration::ZERO {
                answer.headers.insert(LOAD_MS, HeaderValue::from(body.load_ms));
            }
            answer
        }
        Err(e) => infer_error(&e),
    }
}

/// The error answer for `e`.
pub(crate) fn infer_error(e: &InferError) -> Answer {
    let error = Answer::error;
    let message = e.to_string();
    match e {
        InferError::Load(failed) => {
            let status = match failed.error {
                BackendError::NotFound(_) => StatusCode::NOT_FOUND,
                BackendError::InvalidInput(_) => StatusCode::BAD_REQUEST,
                BackendError::Failed(_) => StatusCode::SERVICE_UNAVAILABLE,
                BackendError::TooLarge(_) => StatusCode::INSUFFICIENT_STORAGE,
            };
            let mut answer = error(status, message);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                let secs = failed.retry_after.as_secs() + u64::from(failed.retry_after.subsec_nanos() > 0);
                answer.headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            answer
        }
        InferError::Infer(BackendError::NotFound(_)) => error(StatusCode::NOT_FOUND, message),
        InferError::Infer(BackendError::InvalidInput(_)) => error(StatusCode::BAD_REQUEST, message),
        InferError::Infer(BackendError::Failed(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        InferError::Infer(BackendError::TooLarge(_)) => error(StatusCode::INSUFFICIENT_STORAGE, message),
        // A blocking request is never cancelled; a queued job's cancellation answers itself.
        InferError::Closed | InferError::Cancelled => error(StatusCode::SERVICE_UNAVAILABLE, message),
        InferError::Overloaded => {
            let mut answer = error(StatusCode::TOO_MANY_REQUESTS, message);
            answer.headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            answer
                .headers
                .insert(HeaderName::from_static(OVERLOADED_HEADER), HeaderValue::from_static("queue-full"));
            answer
        }
    }
}

/// The `/hints` document: the core [`HintsReport`](hint_router_core::wire::HintsReport) and the
/// runner's queue figures.
#[derive(Serialize)]
struct HintsDocument {
    #[serde(flatten)]
    report: hint_router_core::wire::HintsReport,
    max_queue: u32,
    running: u32,
    queued: u32,
    refused_total: u64,
    connections_refused_total: u64,
}

async fn hints(State(runner): State<Runner>) -> Response {
    let report = runner.report();
    let running = runner.running();
    let queued = report.in_flight.saturating_sub(running);
    let document = HintsDocument {
        report,
        max_queue: runner.config().max_queue,
        running,
        queued,
        refused_total: runner.refused_total(),
        connections_refused_total: runner.connections_refused_total(),
    };
    Json(document).into_response()
}

async fn healthz(State(runner): State<Runner>) -> Response {
    if runner.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::OK, "ok").into_response()
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}

async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// Adds `x-runner-id` and `x-fal-runner-hints` to every response, after the handler ran.
async fn runner_headers(State(runner): State<Runner>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Ok(id) = HeaderValue::from_str(runner.advertise()) {
        headers.insert(RUNNER_ID, id);
    }
    if let Ok(hints) = HeaderValue::from_str(&format_hints_header(&runner.hints())) {
        headers.insert(RUNNER_HINTS, hints);
    }
    // A blocking request's admission is gone by now, a job's is not: the count excludes the
    // request answered and includes a job it just queued.
    headers.insert(RUNNER_IN_FLIGHT, HeaderValue::from(runner.in_flight()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert!(validate_model_name("a").is_ok());
        assert!(validate_model_name("org/model:v1.2_x-y~!").is_ok());
        assert!(validate_model_name(&"m".repeat(256)).is_ok());
        assert!(validate_model_name("").is_err());
        assert!(validate_model_name(&"m".repeat(257)).is_err());
        assert!(validate_model_name("a,b").is_err());
        assert!(validate_model_name("a b").is_err());
        assert!(validate_model_name("a\tb").is_err());
        assert!(validate_model_name("é").is_err());
        assert!(validate_model_name("a\u{7f}").is_err());
    }

    #[test]
    fn request_prompt_defaults_to_empty() {
        let r: InferRequest = serde_json::from_str(r#"{"model":"m"}"#).unwrap();
        assert_eq!(r.prompt, "");
        assert!(serde_json::from_str::<InferRequest>(r#"{"prompt":"p"}"#).is_err());
    }
}
