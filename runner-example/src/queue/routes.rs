//! The `/queue/...` routes of docs/queue.md, and the task that runs a job.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::Serialize;

use super::store::{Cancel, JobError, Key, LogEntry, Outcome, Phase};
use super::JobQueue;
use crate::backend::BackendError;
use crate::http::{
    error, infer_error, inference_answer, read_request, Answer, InferRequest, OVERLOADED_HEADER,
};
use crate::runner::{Admission, InferError, Runner};

/// The longest `Host` or URL prefix reflected into a job's URLs, in bytes.
const MAX_REFLECTED: usize = 1024;

/// The queue's routes, for [`crate::http::router`]. A trailing `/` is accepted, as the filter
/// accepts it on the client's paths.
pub(crate) fn routes() -> Router<Runner> {
    Router::new()
        .route("/queue/submit", post(submit))
        .route("/queue/submit/", post(submit))
        .route("/queue/requests/{id}", get(result))
        .route("/queue/requests/{id}/", get(result))
        .route("/queue/requests/{id}/status", get(status))
        .route("/queue/requests/{id}/status/", get(status))
        .route("/queue/requests/{id}/cancel", put(cancel))
        .route("/queue/requests/{id}/cancel/", put(cancel))
}

#[derive(Serialize)]
struct Detail {
    detail: &'static str,
}

fn detail(status: StatusCode, detail: &'static str) -> Response {
    Answer::json(status, &Detail { detail }).into_response()
}

fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, "Request not found")
}

/// The start of a job's URLs, `{scheme}://{host}{prefix}/requests`: the scheme of
/// `x-forwarded-proto` (`http` or `https`; else `http`), the `Host`, and the first two
/// segments of `x-envoy-original-path` (`/<owner>/<alias>`, what the client called) or
/// `/queue` for a request that came straight here. What is reflected is checked: a host of
/// host-name characters, a prefix of path characters, neither over [`MAX_REFLECTED`] bytes.
fn url_base(headers: &HeaderMap) -> Result<String, &'static str> {
    let scheme = headers
        .get("x-forwarded-proto")
        // Proxies may have appended theirs: the first is the client's.
        .and_then(|v| v.as_bytes().split(|&b| b == b',').next())
        .map(|v| v.trim_ascii())
        .filter(|v| v.eq_ignore_ascii_case(b"https"))
        .map_or("http", |_| "https");
    let host =
        headers.get(header::HOST).map(HeaderValue::as_bytes).ok_or("the request has no Host header")?;
    let host_byte = |b: u8| b.is_ascii_alphanumeric() || b".-_~:[]".contains(&b);
    if host.is_empty() || host.len() > MAX_REFLECTED || !host.iter().all(|&b| host_byte(b)) {
        return Err("the Host header is not a host name");
    }
    let prefix = match headers.get("x-envoy-original-path") {
        Some(path) => {
            original_prefix(path.as_bytes()).ok_or("x-envoy-original-path has no /<owner>/<alias>")?
        }
        None => "/queue".to_string(),
    };
    // Both checked to be ASCII.
    Ok(format!("{scheme}://{}{prefix}/requests", String::from_utf8_lossy(host)))
}

/// `/<owner>/<alias>` of a client's path: its first two segments, of RFC 3986 path
/// characters only, at most [`MAX_REFLECTED`] bytes together.
fn original_prefix(path: &[u8]) -> Option<String> {
    let end = path.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(path.len());
    let mut segments = path.get(..end)?.strip_prefix(b"/")?.split(|&b| b == b'/');
    let (owner, alias) = (segments.next()?, segments.next()?);
    let pchar = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%".contains(&b);
    let fine = |s: &[u8]| !s.is_empty() && s.iter().all(|&b| pchar(b));
    if !fine(owner) || !fine(alias) || owner.len() + alias.len() + 2 > MAX_REFLECTED {
        return None;
    }
    Some(format!("/{}/{}", String::from_utf8_lossy(owner), String::from_utf8_lossy(alias)))
}

#[derive(Serialize)]
struct Submitted {
    request_id: String,
    response_url: String,
    status_url: String,
    cancel_url: String,
    status: &'static str,
    queue_position: usize,
}

/// `POST /queue/submit`: admitted and checked like `POST /`, then answered at once while a
/// task of its own runs the job.
async fn submit(State(runner): State<Runner>, request: Request) -> Response {
    let Some(queue) = runner.queue().cloned() else { return error(StatusCode::NOT_FOUND, "not found") };
    if runner.is_draining() {
        // Its result would go when the runner exits: better another runner takes it.
        let mut answer =
            Answer::error(StatusCode::SERVICE_UNAVAILABLE, "the runner is draining; nothing was accepted");
        answer.headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        answer
            .headers
            .insert(HeaderName::from_static(OVERLOADED_HEADER), HeaderValue::from_static("draining"));
        return answer.into_response();
    }
    let base = match url_base(request.headers()) {
        Ok(base) => base,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let admission = match runner.admit() {
        Ok(admission) => admission,
        Err(e) => return infer_error(&e).into_response(),
    };
    let job = match read_request(request).await {
        Ok(job) => job,
        Err(refused) => return refused,
    };
    let model = job.model.clone();
    let accepted = queue.accept(&model, |key| {
        tokio::spawn(run(runner.clone(), Arc::clone(&queue), key, admission, job)).abort_handle()
    });
    let (request_id, queue_position) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("no request id: {e}")),
    };
    let response_url = format!("{base}/{request_id}");
    let body = Submitted {
        status_url: format!("{response_url}/status"),
        cancel_url: format!("{response_url}/cancel"),
        response_url,
        request_id,
        status: "IN_QUEUE",
        queue_position,
    };
    Answer::json(StatusCode::OK, &body).into_response()
}

/// Runs a job and records its answer. Aborting the task while the job is queued cancels it:
/// its admission goes with the future, and a load it waits for goes on for others.
async fn run(runner: Runner, queue: Arc<JobQueue>, key: Key, admission: Admission, job: InferRequest) {
    let mut unanswered = Unanswered { queue: Arc::clone(&queue), key, armed: true };
    let InferRequest { model, prompt, evict } = job;
    let on_start = |starting: &_| queue.start(key, starting);
    let result = runner.infer_admitted_with(admission, &model, evict.as_deref(), prompt, on_start).await;
    let error = result.as_ref().err().map(|e| JobError { message: e.to_string(), kind: error_kind(e) });
    queue.finish(key, inference_answer(model, result), error);
    unanswered.armed = false;
}

/// Ends a job whose task stopped without an answer (a panic, the runtime shutting down) as
/// failed, so that its status never says IN_PROGRESS forever. For a job cancelled while
/// queued (whose task is aborted) it does nothing: that job has ended already.
struct Unanswered {
    queue: Arc<JobQueue>,
    key: Key,
    armed: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.armed {
            let message = "the job ended without an answer";
            let answer = Answer::error(StatusCode::INTERNAL_SERVER_ERROR, message);
            self.queue.finish(self.key, answer, Some(JobError { message: message.into(), kind: "Internal" }));
        }
    }
}

/// The status's `error_type` for `e`.
fn error_kind(e: &InferError) -> &'static str {
    match e {
        InferError::Load(failed) => match failed.error {
            BackendError::NotFound(_) => "ModelNotFound",
            BackendError::InvalidInput(_) => "InvalidInput",
            BackendError::Failed(_) => "LoadFailed",
            BackendError::TooLarge(_) => "ModelTooLarge",
        },
        InferError::Infer(BackendError::InvalidInput(_)) => "InvalidInput",
        InferError::Infer(_) => "InferenceFailed",
        InferError::Closed => "RunnerClosed",
        InferError::Overloaded => "Overloaded",
        InferError::Cancelled => "Cancelled",
    }
}

/// The job an id names, when it is one of ours.
fn job(runner: &Runner, id: &Result<Path<String>, PathRejection>) -> Option<(Arc<JobQueue>, Key)> {
    let queue = runner.queue()?;
    let key = queue.key(id.as_ref().ok()?)?;
    Some((Arc::clone(queue), key))
}

#[derive(Serialize)]
struct StatusBody {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_position: Option<usize>,
    response_url: String,
    logs: Option<Vec<LogLine>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_type: Option<&'static str>,
}

#[derive(Serialize)]
struct Metrics {
    /// Seconds; absent when no inference ran (a failed load, a cancelled job).
    #[serde(skip_serializing_if = "Option::is_none")]
    inference_time: Option<f64>,
}

#[derive(Serialize)]
struct LogLine {
    message: String,
    level: &'static str,
    source: &'static str,
    timestamp: String,
}

impl From<LogEntry> for LogLine {
    fn from(entry: LogEntry) -> Self {
        let timestamp = super::store::rfc3339(entry.at);
        Self { message: entry.message, level: entry.level, source: "runner", timestamp }
    }
}

/// `?logs=1` or `?logs=true`.
fn wants_logs(uri: &Uri) -> bool {
    uri.query().is_some_and(|query| {
        query.split('&').any(|pair| {
            pair.split_once('=').is_some_and(|(key, value)| {
                key == "logs" && (value == "1" || value.eq_ignore_ascii_case("true"))
            })
        })
    })
}

/// `GET /queue/requests/{id}/status`.
async fn status(
    State(runner): State<Runner>,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some((queue, key)) = job(&runner, &id) else { return not_found() };
    let Some((phase, logs)) = queue.status(key, wants_logs(&uri)) else { return not_found() };
    let base = match url_base(&headers) {
        Ok(base) => base,
        Err(why) => return detail(StatusCode::BAD_REQUEST, why),
    };
    let mut body = StatusBody {
        status: "COMPLETED",
        queue_position: None,
        response_url: format!("{base}/{}", queue.id(key)),
        logs: logs.map(|logs| logs.into_iter().map(LogLine::from).collect()),
        metrics: None,
        error: None,
        error_type: None,
    };
    match phase {
        Phase::Queued { position } => (body.status, body.queue_position) = ("IN_QUEUE", Some(position)),
        Phase::Running => body.status = "IN_PROGRESS",
        Phase::Done(Outcome::Answered { error, inference_time, .. }) => {
            body.metrics = Some(Metrics { inference_time: inference_time.map(|t| t.as_secs_f64()) });
            if let Some(error) = error {
                (body.error, body.error_type) = (Some(error.message), Some(error.kind));
            }
        }
        Phase::Done(Outcome::Cancelled) => {
            body.metrics = Some(Metrics { inference_time: None });
            (body.error, body.error_type) = (Some("Request was cancelled".into()), Some("Cancelled"));
        }
    }
    Answer::json(StatusCode::OK, &body).into_response()
}

/// `GET /queue/requests/{id}`: the job's own answer once it has one.
async fn result(State(runner): State<Runner>, id: Result<Path<String>, PathRejection>) -> Response {
    let Some((queue, key)) = job(&runner, &id) else { return not_found() };
    match queue.status(key, false) {
        None => not_found(),
        Some((Phase::Queued { .. } | Phase::Running, _)) => {
            detail(StatusCode::BAD_REQUEST, "Request is still in progress")
        }
        Some((Phase::Done(Outcome::Cancelled), _)) => {
            detail(StatusCode::BAD_REQUEST, "Request was cancelled")
        }
        Some((Phase::Done(Outcome::Answered { answer, .. }), _)) => answer.into_response(),
    }
}

#[derive(Serialize)]
struct CancelBody {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'static str>,
}

/// `PUT /queue/requests/{id}/cancel`.
async fn cancel(State(runner): State<Runner>, id: Result<Path<String>, PathRejection>) -> Response {
    let outcome = match job(&runner, &id) {
        Some((queue, key)) => queue.cancel(key),
        None => Cancel::NotFound,
    };
    let (code, status, detail) = match outcome {
        Cancel::Cancelled(_) => (StatusCode::OK, "OK", None),
        Cancel::Requested => (StatusCode::ACCEPTED, "CANCELLATION_REQUESTED", None),
        Cancel::AlreadyDone => (StatusCode::BAD_REQUEST, "ALREADY_COMPLETED", None),
        // Both shapes: fal's cancel answers `status`, every other unknown id `detail`.
        Cancel::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND", Some("Request not found")),
    };
    Answer::json(code, &CancelBody { status, detail }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for &(name, value) in pairs {
            headers.insert(name, HeaderValue::from_bytes(value.as_bytes()).unwrap());
        }
        headers
    }

    #[test]
    fn urls_come_from_the_headers_checked() {
        let base = |pairs: &[(&'static str, &str)]| url_base(&headers(pairs));
        assert_eq!(base(&[("host", "10.0.0.1:8080")]).unwrap(), "http://10.0.0.1:8080/queue/requests");
        assert_eq!(
            base(&[
                ("host", "queue.example.com"),
                ("x-forwarded-proto", "https, http"),
                ("x-envoy-original-path", "/myuser/myapp/generate?x=1"),
            ])
            .unwrap(),
            "https://queue.example.com/myuser/myapp/requests"
        );
        assert_eq!(
            base(&[("host", "[::1]:1"), ("x-forwarded-proto", "gopher"), ("x-envoy-original-path", "/o/a")])
                .unwrap(),
            "http://[::1]:1/o/a/requests"
        );
        let long = "h".repeat(MAX_REFLECTED + 1);
        let long_path = format!("/o/{}", "a".repeat(MAX_REFLECTED));
        for bad in [
            &[][..] as &[(&'static str, &str)],
            &[("host", "")],
            &[("host", "evil.com/x?")],
            &[("host", "a ")],
            &[("host", "caf\u{e9}")],
            &[("host", long.as_str())],
            &[("host", "h"), ("x-envoy-original-path", "/o")],
            &[("host", "h"), ("x-envoy-original-path", "o/a")],
            &[("host", "h"), ("x-envoy-original-path", "//a/")],
            &[("host", "h"), ("x-envoy-original-path", "/o/a\"")],
            &[("host", "h"), ("x-envoy-original-path", long_path.as_str())],
        ] {
            assert!(base(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn logs_are_asked_for_with_1_or_true() {
        let asks = |uri: &str| wants_logs(&uri.parse().unwrap());
        assert!(asks("/s?logs=1"));
        assert!(asks("/s?x=2&logs=true"));
        assert!(asks("/s?logs=True"));
        assert!(!asks("/s"));
        assert!(!asks("/s?logs=0"));
        assert!(!asks("/s?logs"));
        assert!(!asks("/s?xlogs=1"));
    }
}
