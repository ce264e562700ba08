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
        resp.bytes().await?;
        Ok(Answer {
            status,
            overflow,
            hit: cache.as_deref() == Some("hit"),
            runner: runner.and_then(|r| addrs.iter().position(|a| *a == r)),
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
            return Ok(Answer { status, overflow, hit: false, runner: None });
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
                return Ok(Answer { status: code, overflow: false, hit: false, runner: None });
            }
            let st: serde_json::Value = serde_json::from_slice(&body).context("status answer")?;
            if st.get("status").and_then(|v| v.as_str()) == Some("COMPLETED") {
                if st.get("error").is_some_and(|e| !e.is_null()) {
                    return Ok(Answer { status: 500, overflow: false, hit: false, runner: None });
                }
                break;
            }
        }
        let resp = client.get(&response_url).send().await?;
        let status = resp.status().as_u16();
        let (cache_header, runner) = (header(&resp, "x-cache"), header(&resp, "x-runner-id"));
        let body = resp.bytes().await?;
        let cache = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|d| d.get("cache").and_then(|c| c.as_str()).map(str::to_string))
            .or(cache_header);
        let runner =
            runner.and_then(|r| addrs.iter().position(|a| *a == r)).or_else(|| runner_by_token(&id, &tokens));
        Ok(Answer { status, overflow: false, hit: cache.as_deref() == Some("hit"), runner })
    };
    let result = tokio::time::timeout_at(sched + drive.timeout, fut).await;
    Sent { rec: record(result, sched, drive.timeout), lag_us, polls: polls.load(Ordering::Relaxed) }
}

#[cfg(test)]
mod tests {
    use super::*;

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
