//! The request drivers: one request of the trace through one door, as a [`Record`].

use crate::report::{Record, Status};
use anyhow::{anyhow, Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The app path the queue driver submits to (`/<owner>/<alias>`; any app reaches the runners).
pub const QUEUE_APP: &str = "/bench/app";

/// How the driver sends requests.
#[derive(Debug, Clone, Copy)]
pub struct Drive {
    /// Each request's limit, from its scheduled send time.
    pub timeout: Duration,
    /// Queue door: the wait between status polls (also before the first).
    pub poll: Duration,
}

/// What one request task reports.
pub(super) struct Sent {
    /// The request's record.
    pub(super) rec: Record,
    /// Send lag, microseconds.
    pub(super) lag_us: u64,
    /// Status polls (queue door).
    pub(super) polls: u64,
}

/// The answer that decides a request's record.
struct Answer {
    status: u16,
    overflow: bool,
    hit: bool,
    runner: Option<usize>,
    /// The runner's `queue_ms` and `slot_ms` (200s), microseconds.
    waits: Waits,
}

/// The runner's own waits in an inference answer, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Waits {
    /// `queue_ms`: for a cache slot and an inference slot.
    queue_us: u64,
    /// `slot_ms`: of that, for an inference slot.
    slot_us: u64,
}

impl Answer {
    /// An answer that carries no inference.
    fn failed(status: u16, overflow: bool) -> Answer {
        Answer { status, overflow, hit: false, runner: None, waits: Waits::default() }
    }
}

/// What an inference answer's body says: its `cache` (`hit` or `miss`) and the runner's
/// `queue_ms` and `slot_ms`. Tolerant: a body that is not JSON, or lacks a field or has it of
/// another type, gives `None` or 0 for it.
fn answer_body(body: &[u8]) -> (Option<String>, Waits) {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else { return (None, Waits::default()) };
    let cache = doc.get("cache").and_then(|c| c.as_str()).map(str::to_string);
    let us = |name: &str| {
        doc.get(name)
            .and_then(serde_json::Value::as_f64)
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map_or(0, |ms| (ms * 1000.0).round() as u64)
    };
    (cache, Waits { queue_us: us("queue_ms"), slot_us: us("slot_ms") })
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// A request for `model` to `url`, hinted, as both doors send it.
fn hinted_post(client: &reqwest::Client, url: &str, model: &str) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("content-type", "application/json")
        .header("x-fal-runner-hint", model)
        .body(request_body(model))
}

fn request_body(model: &str) -> String {
    format!("{{\"model\":\"{model}\",\"prompt\":\"hello\"}}")
}

/// Turns the driver's outcome into a record.
fn record(
    result: Result<Result<Answer>, tokio::time::error::Elapsed>,
    sched: Instant,
    timeout: Duration,
) -> Record {
    let latency_us = Instant::now().saturating_duration_since(sched).as_micros() as u64;
    let mut rec = Record { latency_us, ..Record::default() };
    match result {
        Err(_) => {
            rec.status = Status::Timeout;
            rec.latency_us = timeout.as_micros() as u64;
        }
        Ok(Err(_)) => rec.status = Status::Error,
        Ok(Ok(a)) => {
            rec.status = match a.status {
                200 => Status::Ok,
                503 if a.overflow => Status::Overflow,
                _ => Status::Error,
            };
            rec.hit = a.hit;
            rec.runner = a.runner.map(|i| i as u32);
            if rec.status == Status::Ok {
                (rec.queue_us, rec.slot_us) = (a.waits.queue_us, a.waits.slot_us);
            }
        }
    }
    rec
}

pub(super) async fn one_request(
    client: reqwest::Client,
    url: String,
    model: String,
    sched: Instant,
    timeout: Duration,
    addrs: Arc<Vec<String>>,
) -> Sent {
    let lag_us = Instant::now().saturating_duration_since(sched).as_micros() as u64;
    let fut = async {
        let resp = hinted_post(&client, &url, &model).send().await?;
        let status = resp.status().as_u16();
        let (cache, runner) = (header(&resp, "x-cache"), header(&resp, "x-runner-id"));
        let overflow = header(&resp, "x-envoy-overloaded").is_some();
        let body = resp.bytes().await?;
        let waits = if status == 200 { answer_body(&body).1 } else { Waits::default() };
        Ok(Answer {
            status,
            overflow,
            hit: cache.as_deref() == Some("hit"),
            runner: runner.and_then(|r| addrs.iter().position(|a| *a == r)),
            waits,
        })
    };
    let result = tokio::time::timeout_at(sched + timeout, fut).await;
    Sent { rec: record(result, sched, timeout), lag_us, polls: 0 }
}

/// `url` with its scheme and authority replaced by `base` (`http://host:port`): the runner
/// builds job URLs from the request's `Host` and `x-forwarded-proto`.
fn rebase(url: &str, base: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let path = rest.find('/').and_then(|i| rest.get(i..))?;
    Some(format!("{base}{path}"))
}

/// The runner holding a request id: by its queue token (`<token>-<hex>`).
fn runner_by_token(id: &str, tokens: &[Option<String>]) -> Option<usize> {
    let token = id.split_once('-')?.0;
    tokens.iter().position(|t| t.as_deref() == Some(token))
}

/// The runners' queue tokens (`/hints` `queue_token`), in `addrs` order.
pub(super) async fn queue_tokens(client: &reqwest::Client, addrs: &[String]) -> Vec<Option<String>> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let token = async {
            let body = client.get(format!("http://{a}/hints")).send().await.ok()?.bytes().await.ok()?;
            let doc: serde_json::Value = serde_json::from_slice(&body).ok()?;
            doc.get("queue_token")?.as_str().map(str::to_string)
        };
        out.push(token.await);
    }
    out
}

/// The queue door's driver for one request: submit, poll the status every `poll` until
/// COMPLETED, fetch the result. Latency runs from the scheduled time to the result's end.
pub(super) async fn one_queue_request(
    client: reqwest::Client,
    base: String,
    model: String,
    sched: Instant,
    drive: Drive,
    addrs: Arc<Vec<String>>,
    tokens: Arc<Vec<Option<String>>>,
) -> Sent {
    let lag_us = Instant::now().saturating_duration_since(sched).as_micros() as u64;
    let polls = AtomicU64::new(0);
    let fut = async {
        let resp = hinted_post(&client, &format!("{base}{QUEUE_APP}"), &model).send().await?;
        let status = resp.status().as_u16();
        let overflow = header(&resp, "x-envoy-overloaded").is_some();
        let body = resp.bytes().await?;
        if status != 200 {
            return Ok(Answer::failed(status, overflow));
        }
        let doc: serde_json::Value = serde_json::from_slice(&body).context("submit answer")?;
        let field = |name: &str| doc.get(name).and_then(|v| v.as_str()).map(str::to_string);
        let id = field("request_id").ok_or_else(|| anyhow!("no request_id in the submit answer"))?;
        let job = format!("{base}{QUEUE_APP}/requests/{id}");
        let status_url =
            field("status_url").and_then(|u| rebase(&u, &base)).unwrap_or(format!("{job}/status"));
        let response_url = field("response_url").and_then(|u| rebase(&u, &base)).unwrap_or(job);
        loop {
            tokio::time::sleep(drive.poll).await;
            polls.fetch_add(1, Ordering::Relaxed);
            let resp = client.get(&status_url).send().await?;
            let code = resp.status().as_u16();
            let body = resp.bytes().await?;
            if code != 200 {
                return Ok(Answer::failed(code, false));
            }
            let st: serde_json::Value = serde_json::from_slice(&body).context("status answer")?;
            if st.get("status").and_then(|v| v.as_str()) == Some("COMPLETED") {
                if st.get("error").is_some_and(|e| !e.is_null()) {
                    return Ok(Answer::failed(500, false));
                }
                break;
            }
        }
        let resp = client.get(&response_url).send().await?;
        let status = resp.status().as_u16();
        let (cache_header, runner) = (header(&resp, "x-cache"), header(&resp, "x-runner-id"));
        let body = resp.bytes().await?;
        // The job's result is the answer `POST /` would have given: the same body.
        let (cache, waits) = answer_body(&body);
        let cache = cache.or(cache_header);
        let runner =
            runner.and_then(|r| addrs.iter().position(|a| *a == r)).or_else(|| runner_by_token(&id, &tokens));
        Ok(Answer { status, overflow: false, hit: cache.as_deref() == Some("hit"), runner, waits })
    };
    let result = tokio::time::timeout_at(sched + drive.timeout, fut).await;
    Sent { rec: record(result, sched, drive.timeout), lag_us, polls: polls.load(Ordering::Relaxed) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_bodies_give_cache_and_queue_time() {
        let w = |queue_us, slot_us| Waits { queue_us, slot_us };
        let body =
            br#"{"model":"m","output":"o","cache":"hit","queue_ms":12,"slot_ms":5,"load_ms":0,"infer_ms":10}"#;
        assert_eq!(answer_body(body), (Some("hit".to_string()), w(12_000, 5_000)));
        let older = br#"{"cache":"miss","queue_ms":0.25}"#;
        assert_eq!(answer_body(older), (Some("miss".to_string()), w(250, 0)));
        // Tolerant: no field, a field of another type, a negative one, not JSON.
        assert_eq!(answer_body(br#"{"cache":"miss"}"#), (Some("miss".to_string()), w(0, 0)));
        assert_eq!(answer_body(br#"{"queue_ms":"7","slot_ms":2}"#), (None, w(0, 2_000)));
        assert_eq!(answer_body(br#"{"queue_ms":-3}"#), (None, w(0, 0)));
        assert_eq!(answer_body(b"upstream connect error"), (None, w(0, 0)));
        assert_eq!(answer_body(b""), (None, w(0, 0)));
    }

    #[test]
    fn only_answered_requests_carry_a_queue_time() {
        let now = Instant::now();
        let t = Duration::from_secs(1);
        let waits = Waits { queue_us: 4_000, slot_us: 1_000 };
        let answer = |status| Answer { status, overflow: false, hit: true, runner: Some(1), waits };
        let ok = record(Ok(Ok(answer(200))), now, t);
        assert_eq!(
            (ok.status, ok.queue_us, ok.slot_us, ok.hit, ok.runner),
            (Status::Ok, 4_000, 1_000, true, Some(1))
        );
        let failed = record(Ok(Ok(answer(500))), now, t);
        assert_eq!((failed.status, failed.queue_us, failed.slot_us), (Status::Error, 0, 0));
        let refused = record(Ok(Ok(Answer::failed(503, true))), now, t);
        assert_eq!((refused.status, refused.queue_us), (Status::Overflow, 0));
    }

    #[test]
    fn job_urls_and_tokens() {
        let base = "http://127.0.0.1:4000";
        assert_eq!(
            rebase("https://example.com:10444/bench/app/requests/ab-cd/status", base).unwrap(),
            "http://127.0.0.1:4000/bench/app/requests/ab-cd/status"
        );
        assert_eq!(
            rebase("http://127.0.0.1:4000/bench/app/requests/x", base).unwrap(),
            "http://127.0.0.1:4000/bench/app/requests/x"
        );
        assert!(rebase("no-scheme/path", base).is_none());
        assert!(rebase("http://host-only", base).is_none());
        let tokens = vec![Some("00aa".to_string()), None, Some("11bb".to_string())];
        assert_eq!(runner_by_token("11bb-0123", &tokens), Some(2));
        assert_eq!(runner_by_token("22cc-0123", &tokens), None);
        assert_eq!(runner_by_token("nodash", &tokens), None);
    }
}
