//! A fast upstream: `n` synthetic runners on loopback, all served by one thread.
//!
//! Each runner answers `GET /hints` with its [`HintsReport`] (naming its own address, as the
//! poller checks), `/healthz` with 200, and anything else with a tiny 200 carrying its hints in
//! `x-fal-runner-hints`, as a real runner would. The hint lists never change, so the filter
//! never learns anything new from them and the table stays put while load runs.

use crate::fixture;
use crate::proc;
use anyhow::{Context, Result};
use bytes::Bytes;
use hint_router_core::wire::{HintsReport, RUNNER_HINTS_HEADER};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::oneshot;

struct Variant {
    hints_json: Bytes,
    hints_header: HeaderValue,
}

struct RunnerData {
    /// The runner's hints, and (runner 0 only) an alternative list it flips to with churn.
    variants: Vec<Variant>,
    churn: Arc<Churn>,
    started: Instant,
    /// Churn on polls: serving the alternative list, and since when.
    flipped: Cell<bool>,
    since: Cell<Instant>,
}

/// How runner 0 changes its list: every `period_ms` by the clock (responses and polls alike),
/// or, `on_polls`, at the first `/hints` answer `period_ms` after the last change.
#[derive(Default)]
struct Churn {
    period_ms: AtomicU64,
    on_polls: AtomicBool,
}

impl RunnerData {
    fn current(&self) -> Option<&Variant> {
        let period = self.churn.period_ms.load(Ordering::Relaxed);
        let flip = if self.churn.on_polls.load(Ordering::Relaxed) {
            self.flipped.get()
        } else {
            period > 0 && (self.started.elapsed().as_millis() as u64 / period) % 2 == 1
        };
        self.variants.get(usize::from(flip)).or(self.variants.first())
    }

    /// A `/hints` answer: with churn on polls, switches lists if the period has passed, so
    /// every poll sees a change when the period is shorter than the poll interval. (The clock's
    /// flip, sampled by polls every ~555 ms, changed the table only every few seconds: the two
    /// periods alias.)
    fn polled(&self) {
        let period = self.churn.period_ms.load(Ordering::Relaxed);
        if !self.churn.on_polls.load(Ordering::Relaxed) || period == 0 || self.variants.len() < 2 {
            self.flipped.set(false);
        } else if self.since.get().elapsed().as_millis() as u64 >= period {
            self.flipped.set(!self.flipped.get());
            self.since.set(Instant::now());
        }
    }
}

/// The running upstream; stops on drop.
pub struct Upstream {
    addrs: Vec<String>,
    churn: Arc<Churn>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds `n` runners with `h` hints each and serves them from one thread, pinned to `cpu`.
    pub fn start(n: usize, h: usize, cpu: Option<usize>) -> Result<Upstream> {
        let mut listeners = Vec::with_capacity(n);
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind upstream")?;
            l.set_nonblocking(true)?;
            addrs.push(l.local_addr()?.to_string());
            listeners.push(l);
        }
        let churn = Arc::new(Churn::default());
        let started = Instant::now();
        let mut data = Vec::with_capacity(n);
        for (i, addr) in addrs.iter().enumerate() {
            let hints = fixture::runner_hints(i, n, h);
            let mut lists = vec![hints.clone()];
            if i == 0 {
                let mut alt = hints;
                alt.pop();
                alt.push("model-churn".into());
                lists.push(alt);
            }
            let mut variants = Vec::new();
            for hints in lists {
                let report = HintsReport {
                    runner: addr.clone(),
                    hints: hints.clone(),
                    loading: Vec::new(),
                    capacity: fixture::CAPACITY,
                    in_flight: 0,
                    max_concurrency: fixture::MAX_CONCURRENCY,
                    draining: false,
                    resident_bytes: None,
                    memory_budget_bytes: None,
                    warm: Vec::new(),
                    queue_token: None,
                };
                variants.push(Variant {
                    hints_json: Bytes::from(serde_json::to_vec(&report)?),
                    hints_header: HeaderValue::from_str(&hints.join(","))?,
                });
            }
            let (flipped, since) = (Cell::new(false), Cell::new(started));
            data.push(RunnerData { variants, churn: Arc::clone(&churn), started, flipped, since });
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new().name("upstream".into()).spawn(move || {
            if let Some(cpu) = cpu {
                if let Err(e) = proc::pin(0, cpu) {
                    eprintln!("upstream: cannot pin to cpu {cpu}: {e}");
                }
            }
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                for (l, d) in listeners.into_iter().zip(data) {
                    let l = match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    tokio::task::spawn_local(accept_loop(l, Rc::new(d)));
                }
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.await;
            });
        })?;
        let up = Upstream { addrs, churn, stop: Some(stop_tx), thread: Some(thread) };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(up),
            Ok(Err(e)) => anyhow::bail!("upstream failed to start: {e}"),
            Err(_) => anyhow::bail!("upstream thread died"),
        }
    }

    /// Runner addresses, `127.0.0.1:PORT`, in order.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Makes runner 0 swap one of its hints every `period_ms` (0 = never): each swap makes
    /// the poller publish a new table, which every worker then reloads.
    pub fn set_churn(&self, period_ms: u64) {
        self.churn.on_polls.store(false, Ordering::Relaxed);
        self.churn.period_ms.store(period_ms, Ordering::Relaxed);
    }

    /// Runner 0 changes its list at the first poll `period_ms` after its last change (0: never).
    pub fn set_churn_on_polls(&self, period_ms: u64) {
        self.churn.on_polls.store(true, Ordering::Relaxed);
        self.churn.period_ms.store(period_ms, Ordering::Relaxed);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(l: tokio::net::TcpListener, d: Rc<RunnerData>) {
    loop {
        let Ok((stream, _)) = l.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let d = Rc::clone(&d);
        tokio::task::spawn_local(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let d = Rc::clone(&d);
                async move { Ok::<_, Infallible>(answer(&d, req.uri().path())) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn answer(d: &RunnerData, path: &str) -> Response<Full<Bytes>> {
    if path == "/hints" {
        d.polled();
    }
    let v = d.current();
    let mut r = match (path, v) {
        ("/hints", Some(v)) => {
            let mut r = Response::new(Full::new(v.hints_json.clone()));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        ("/healthz", _) | (_, None) => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        (_, Some(v)) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            r.headers_mut().insert(RUNNER_HINTS_HEADER, v.hints_header.clone());
            r
        }
    };
    r.headers_mut().insert("x-upstream", HeaderValue::from_static("bench"));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: &str, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_hints_health_and_requests() {
        let up = Upstream::start(3, 4, None).unwrap();
        let a = up.addrs()[1].clone();
        let hints = get(&a, "/hints");
        let body = hints.split("\r\n\r\n").nth(1).unwrap();
        let r: HintsReport = serde_json::from_str(body).unwrap();
        assert_eq!(r.runner, a);
        assert_eq!(r.hints, fixture::runner_hints(1, 3, 4));
        assert!(get(&a, "/healthz").starts_with("HTTP/1.1 200"));
        let resp = get(&a, "/");
        assert!(resp.contains(&format!("x-fal-runner-hints: {}", r.hints.join(","))), "{resp}");
        // Churn: runner 0 alternates between two lists.
        up.set_churn(1);
        let a0 = up.addrs()[0].clone();
        let mut seen = std::collections::HashSet::new();
        let end = Instant::now() + std::time::Duration::from_secs(5);
        while seen.len() < 2 && Instant::now() < end {
            let body = get(&a0, "/hints");
            let r: HintsReport = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            seen.insert(r.hints.contains(&"model-churn".to_string()));
        }
        assert_eq!(seen.len(), 2);
        // Churn on polls: each /hints answer a period after the last change switches lists.
        up.set_churn_on_polls(1);
        let churned = |body: String| {
            let r: HintsReport = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            r.hints.contains(&"model-churn".to_string())
        };
        let mut answers = Vec::new();
        for _ in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            answers.push(churned(get(&a0, "/hints")));
        }
        assert!(answers.windows(2).all(|w| w[0] != w[1]), "{answers:?}");
    }
}
