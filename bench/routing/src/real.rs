//! The same traces through a real Envoy and real `runner-example` processes on 127.0.0.1.
//!
//! For one point every policy gets its own stack (its own runners and its own Envoy, rendered
//! from the shipped `envoy/envoy.yaml` by the e2e harness) and all stacks are fed the same
//! trace at the same time, so that machine noise hits every policy alike. Requests are sent
//! open loop at their scheduled times; latency counts from the scheduled time.

use crate::report::{Quantiles, Record, Status};
use crate::sim::Policy;
use crate::workload::{model_name, Trace};
use anyhow::{anyhow, bail, Context, Result};
use hint_router_e2e::{runner_bin, Envoy, EnvoyOptions};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::time::Instant;

/// A `runner-example` process that counts the model loads it starts (its `loading model` log
/// lines). Killed on drop.
pub struct BenchRunner {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    loads: Arc<AtomicU64>,
}

impl BenchRunner {
    /// Starts `runner-example --listen 127.0.0.1:0 <args>`.
    pub fn start(args: &[String]) -> Result<BenchRunner> {
        let bin = runner_bin();
        if !bin.exists() {
            bail!("{} missing: run `cargo build --release -p runner-example` first", bin.display());
        }
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let loads = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(a) = line.strip_prefix("listening on ") {
                        let _ = tx.send(a.trim().to_string());
                    }
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let loads = Arc::clone(&loads);
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if line.contains("loading model ") {
                        loads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => Ok(BenchRunner { child, addr, loads }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("runner did not report its address within 20 s")
            }
        }
    }

    /// Loads started so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }
}

impl Drop for BenchRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Text surgery on the shipped config for one policy: `(from, to)` replacements for the
/// harness. The hint policy uses the shipped config unchanged.
pub fn config_edits(
    shipped: &str,
    policy: Policy,
    hash_balance_factor: u32,
) -> Result<Vec<(String, String)>> {
    let mut edits = vec![plain_queue_listener(shipped)?];
    // Keep the runner's identity header on responses, to count requests per runner.
    let hide = "              response_headers_to_remove: [x-runner-id]\n";
    if shipped.contains(hide) {
        edits.push((hide.to_string(), String::new()));
    }
    if policy.is_hint() {
        let anchor = "            \"poll_cluster\": \"hint_router_poll\",\n";
        if shipped.matches(anchor).count() != 1 {
            bail!("the plugin configuration is not where expected in the shipped config");
        }
        let mode = policy.when_holders_busy().as_str();
        edits.push((anchor.to_string(), format!("{anchor}            \"when_holders_busy\": \"{mode}\",\n")));
        return Ok(edits);
    }
    // Drop the wasm HTTP filters, the queue listener's too (the poller service stays; it only
    // polls /hints).
    let start = "          - name: envoy.filters.http.wasm\n";
    let (mut rest, mut found) = (shipped, 0);
    while let Some(wasm) = block_from(rest, start, 10) {
        let at = rest.find(start).unwrap_or(0) + wasm.len();
        rest = rest.get(at..).unwrap_or("");
        edits.push((wasm, String::new()));
        found += 1;
    }
    if found == 0 {
        bail!("wasm filter block not found in the shipped config");
    }
    // Swap the runners cluster's LB policy.
    let cluster_at = shipped
        .find("  - name: runners\n")
        .ok_or_else(|| anyhow!("runners cluster not found in the shipped config"))?;
    let rest = shipped.get(cluster_at..).unwrap_or("");
    let lb = block_from(rest, "    load_balancing_policy:\n", 4)
        .ok_or_else(|| anyhow!("runners cluster has no load_balancing_policy block"))?;
    let typed = |name: &str, ty: &str, extra: &str| {
        format!(
            "    load_balancing_policy:\n      policies:\n      - typed_extension_config:\n          name: envoy.load_balancing_policies.{name}\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.load_balancing_policies.{name}.v3.{ty}\n{extra}"
        )
    };
    let new_lb = match policy {
        Policy::RoundRobin => typed("round_robin", "RoundRobin", ""),
        Policy::LeastRequest => typed("least_request", "LeastRequest", ""),
        Policy::RingHash => typed("ring_hash", "RingHash", ""),
        Policy::RingHashBounded => typed(
            "ring_hash",
            "RingHash",
            &format!(
                "            consistent_hashing_lb_config: {{hash_balance_factor: {hash_balance_factor}}}\n"
            ),
        ),
        Policy::Hint | Policy::HintFastest => String::new(),
    };
    if shipped.matches(lb.as_str()).count() != 1 {
        bail!("the runners cluster's load_balancing_policy block is not unique in the shipped config");
    }
    edits.push((lb, new_lb));
    if matches!(policy, Policy::RingHash | Policy::RingHashBounded) {
        // Every route to the runners (the HTTP and the HTTPS listener's): the edit applies
        // to all of them.
        let route = "                  cluster: runners\n";
        if shipped.matches(route).count() == 0 {
            bail!("the route to the runners cluster is not where expected in the shipped config");
        }
        edits.push((
            route.to_string(),
            format!("{route}                  hash_policy:\n                  - header: {{header_name: x-fal-runner-hint}}\n"),
        ));
    }
    Ok(edits)
}

/// The edit that makes the queue listener (`public_queue`) plain HTTP: the bench's client
/// speaks no TLS. Everything else of the listener is kept.
fn plain_queue_listener(shipped: &str) -> Result<(String, String)> {
    let tls = "    - transport_socket: *dev_tls_socket\n      filters:\n";
    let at = shipped
        .find("  - name: public_queue\n")
        .ok_or_else(|| anyhow!("the queue listener public_queue is not in the shipped config"))?;
    let listener =
        block_from(shipped.get(at..).unwrap_or(""), "  - name: public_queue\n", 3).unwrap_or_default();
    if !listener.contains(tls) || shipped.matches(tls).count() != 1 {
        bail!("the queue listener's TLS transport socket is not where expected in the shipped config");
    }
    Ok((tls.to_string(), "    - filters:\n".to_string()))
}

/// The text from the line `start` to the next line indented less than `indent` spaces, or
/// (at the same indentation) starting a new list item; `None` if `start` is absent.
fn block_from(text: &str, start: &str, indent: usize) -> Option<String> {
    let at = text.find(start)?;
    let body = text.get(at + start.len()..)?;
    let mut len = start.len();
    for line in body.split_inclusive('\n') {
        let lead = line.len() - line.trim_start_matches(' ').len();
        let ends = line.trim().is_empty()
            || lead < indent
            || (lead == indent && line.trim_start().starts_with("- "));
        if ends {
            break;
        }
        len += line.len();
    }
    text.get(at..at + len).map(str::to_string)
}

/// Which of Envoy's doors a stack's requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Door {
    /// `POST /` on the public listener: the answer is the inference's.
    #[default]
    Blocking,
    /// fal's queue on the queue listener: submit, poll the status until COMPLETED, fetch the
    /// result (docs/queue.md).
    Queue,
}

impl Door {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Door::Blocking => "blocking",
            Door::Queue => "queue",
        }
    }
}

/// The app path the queue driver submits to (`/<owner>/<alias>`; any app reaches the runners).
pub const QUEUE_APP: &str = "/bench/app";

/// One policy's stack: its runners and its Envoy.
pub struct Stack {
    /// Which policy.
    pub policy: Policy,
    /// Which door the trace goes through.
    pub door: Door,
    // Envoy first: dropped (killed) before the runners.
    envoy: Envoy,
    runners: Vec<BenchRunner>,
}

impl Stack {
    /// Starts `n` runners and an Envoy configured for `policy`; the trace will go through
    /// `door`.
    pub fn start(
        policy: Policy,
        door: Door,
        n: usize,
        runner_args: &[String],
        envoy_concurrency: u32,
        hash_balance_factor: u32,
    ) -> Result<Stack> {
        if door == Door::Queue && !policy.is_hint() {
            bail!("the queue door needs the hint-router filter (policy {policy} has none there)");
        }
        let runners = (0..n).map(|_| BenchRunner::start(runner_args)).collect::<Result<Vec<_>>>()?;
        let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
        let opts = EnvoyOptions::default();
        let shipped_path = hint_router_e2e::repo_root().join(&opts.config_file);
        let shipped = std::fs::read_to_string(&shipped_path)
            .with_context(|| format!("reading {}", shipped_path.display()))?;
        let opts = EnvoyOptions {
            concurrency: envoy_concurrency,
            replace: config_edits(&shipped, policy, hash_balance_factor)?,
            ..opts
        };
        let expect = if policy.is_hint() { n as u64 } else { 0 };
        // The harness panics (with Envoy's log) when Envoy does not come up; turn that into
        // an error so the runners already started are dropped in order.
        let envoy =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Envoy::start(&addrs, &opts, expect)))
                .map_err(|_| anyhow!("envoy for policy {policy} did not start (see its log above)"))?;
        Ok(Stack { policy, door, envoy, runners })
    }

    /// `policy`, and ` (queue)` for the queue door.
    pub fn label(&self) -> String {
        match self.door {
            Door::Blocking => self.policy.to_string(),
            Door::Queue => format!("{} (queue)", self.policy),
        }
    }

    /// The runners' addresses, in config order.
    pub fn addrs(&self) -> Vec<String> {
        self.runners.iter().map(|r| r.addr.clone()).collect()
    }

    /// Loads started on all runners so far.
    pub fn loads(&self) -> u64 {
        self.runners.iter().map(BenchRunner::loads).sum()
    }

    /// Envoy's public listener URL.
    pub fn url(&self) -> String {
        self.envoy.url()
    }

    /// The queue listener's base URL (plain HTTP in the bench), no trailing slash.
    pub fn queue_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.envoy.queue_port)
    }

    /// Envoy's admin base URL, no trailing slash.
    pub fn admin_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.envoy.admin)
    }

    /// Envoy's scratch directory (config and log).
    pub fn dir(&self) -> &Path {
        &self.envoy.dir
    }
}

/// What one stack did with the trace.
#[derive(Debug, Clone)]
pub struct RealRun {
    /// One record per request of the trace.
    pub records: Vec<Record>,
    /// Loads started during the measured window.
    pub loads_in_window: u64,
    /// Requests sent per second over the measured window.
    pub achieved_rps: f64,
    /// 99th percentile of the send lag (actual - scheduled), ms.
    pub send_lag_p99_ms: f64,
    /// The filter's counters (`wasmcustom.hint_router.*`, the prefix dropped) over the
    /// measured window; empty without the filter.
    pub filter_counters: BTreeMap<String, u64>,
    /// Queue door: status polls per measured request (mean).
    pub polls_per_request: Option<f64>,
}

/// How the driver sends requests.
#[derive(Debug, Clone, Copy)]
pub struct Drive {
    /// Each request's limit, from its scheduled send time.
    pub timeout: Duration,
    /// Queue door: the wait between status polls (also before the first).
    pub poll: Duration,
}

/// What one request task reports.
struct Sent {
    rec: Record,
    /// Send lag, microseconds.
    lag_us: u64,
    /// Status polls (queue door).
    polls: u64,
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

async fn one_request(
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
async fn queue_tokens(client: &reqwest::Client, addrs: &[String]) -> Vec<Option<String>> {
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
async fn one_queue_request(
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

/// The filter's counters of one Envoy (`wasmcustom.hint_router.*`, the prefix dropped).
async fn filter_counters(client: &reqwest::Client, admin: &str) -> BTreeMap<String, u64> {
    let prefix = "wasmcustom.hint_router.";
    let url = format!("{admin}/stats?filter=^wasmcustom\\.hint_router\\.");
    let Ok(resp) = client.get(url).send().await else { return BTreeMap::new() };
    let Ok(text) = resp.text().await else { return BTreeMap::new() };
    text.lines()
        .filter_map(|l| {
            let (name, v) = l.split_once(": ")?;
            Some((name.strip_prefix(prefix)?.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Every stack's filter counters.
type Counters = Vec<BTreeMap<String, u64>>;

/// Every stack's filter counters (`admins`: the Envoys' admin URLs, `None` without the filter).
async fn all_counters(client: reqwest::Client, admins: Vec<Option<String>>) -> Counters {
    let mut out = Vec::with_capacity(admins.len());
    for a in &admins {
        out.push(match a {
            Some(a) => filter_counters(&client, a).await,
            None => BTreeMap::new(),
        });
    }
    out
}

/// Sends `trace` to every stack at once (each request at its scheduled time to all of them,
/// through each stack's door) and waits for all answers (each bounded by `drive.timeout`).
pub async fn run_trace(stacks: &[Stack], trace: &Trace, drive: Drive) -> Result<Vec<RealRun>> {
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let names: Vec<String> = (0..trace.spec.models as u32).map(model_name).collect();
    let mut targets = Vec::with_capacity(stacks.len());
    for s in stacks {
        let addrs = s.addrs();
        let tokens = match s.door {
            Door::Queue => queue_tokens(&client, &addrs).await,
            Door::Blocking => Vec::new(),
        };
        let url = match s.door {
            Door::Blocking => s.url(),
            Door::Queue => s.queue_base(),
        };
        targets.push((s.door, url, Arc::new(addrs), Arc::new(tokens)));
    }
    let n = trace.reqs.len();
    let mut handles: Vec<Vec<tokio::task::JoinHandle<Sent>>> =
        targets.iter().map(|_| Vec::with_capacity(n)).collect();
    let start = Instant::now() + Duration::from_millis(50);
    let w0 = start + Duration::from_micros(trace.spec.warmup_us);
    let w1 = w0 + Duration::from_micros(trace.spec.measure_us);
    let admins: Vec<Option<String>> =
        stacks.iter().map(|s| s.policy.is_hint().then(|| s.admin_base())).collect();
    // Read in a task of its own, not to delay the sends.
    let mut at_w0: Option<(Vec<u64>, tokio::task::JoinHandle<Counters>)> = None;
    for req in &trace.reqs {
        let sched = start + Duration::from_micros(req.at_us);
        if at_w0.is_none() && sched >= w0 {
            tokio::time::sleep_until(w0).await;
            let loads = stacks.iter().map(Stack::loads).collect();
            at_w0 = Some((loads, tokio::spawn(all_counters(client.clone(), admins.clone()))));
        }
        tokio::time::sleep_until(sched).await;
        let model = names.get(req.model as usize).cloned().unwrap_or_default();
        for ((door, url, addrs, tokens), hs) in targets.iter().zip(handles.iter_mut()) {
            let (client, url, model, addrs) = (client.clone(), url.clone(), model.clone(), Arc::clone(addrs));
            hs.push(match door {
                Door::Blocking => tokio::spawn(one_request(client, url, model, sched, drive.timeout, addrs)),
                Door::Queue => tokio::spawn(one_queue_request(
                    client,
                    url,
                    model,
                    sched,
                    drive,
                    addrs,
                    Arc::clone(tokens),
                )),
            });
        }
    }
    tokio::time::sleep_until(w1).await;
    let l1: Vec<u64> = stacks.iter().map(Stack::loads).collect();
    let c1 = tokio::spawn(all_counters(client.clone(), admins));
    let (l0, c0) = match at_w0 {
        Some((loads, counters)) => (loads, counters.await.context("reading the filter counters")?),
        None => (vec![0; stacks.len()], vec![BTreeMap::new(); stacks.len()]),
    };
    let c1 = c1.await.context("reading the filter counters")?;
    let secs = trace.spec.measure_us as f64 / 1e6;
    let mut runs = Vec::with_capacity(stacks.len());
    for (k, (hs, (door, ..))) in handles.into_iter().zip(&targets).enumerate() {
        let mut records = Vec::with_capacity(n);
        let mut lags = Vec::with_capacity(n);
        let (mut sent_in_window, mut polls) = (0u64, 0u64);
        for (i, h) in hs.into_iter().enumerate() {
            let sent = h.await.context("request task failed")?;
            if i >= trace.first_measured {
                lags.push(sent.lag_us);
                sent_in_window += 1;
                polls += sent.polls;
            }
            records.push(sent.rec);
        }
        lags.sort_unstable();
        let before = c0.get(k).cloned().unwrap_or_default();
        let filter_counters = c1
            .get(k)
            .map(|m| {
                m.iter()
                    .map(|(name, v)| (name.clone(), v.saturating_sub(before.get(name).copied().unwrap_or(0))))
                    .collect()
            })
            .unwrap_or_default();
        runs.push(RealRun {
            records,
            loads_in_window: l1.get(k).copied().unwrap_or(0).saturating_sub(l0.get(k).copied().unwrap_or(0)),
            achieved_rps: sent_in_window as f64 / secs,
            send_lag_p99_ms: Quantiles::of(lags.iter().copied()).get(0.99) as f64 / 1000.0,
            filter_counters,
            polls_per_request: (*door == Door::Queue).then(|| polls as f64 / sent_in_window.max(1) as f64),
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        // The config the bench renders (the harness's default).
        let file = EnvoyOptions::default().config_file;
        std::fs::read_to_string(hint_router_e2e::repo_root().join(file)).unwrap()
    }

    #[test]
    fn config_edits_apply_to_the_shipped_config() {
        let text = shipped();
        for policy in Policy::ALL {
            let edits = config_edits(&text, policy, 150).unwrap();
            let mut t = text.clone();
            for (from, to) in &edits {
                assert!(t.contains(from.as_str()), "{policy}: {from}");
                t = t.replace(from.as_str(), to);
            }
            let has_wasm = t.contains("envoy.filters.http.wasm");
            assert_eq!(has_wasm, policy.is_hint(), "{policy}");
            assert!(!t.contains("response_headers_to_remove: [x-runner-id]"));
            match policy {
                Policy::Hint | Policy::HintFastest => {
                    assert!(t.contains("override_host_sources:\n            - metadata:"));
                    let mode = format!("\"when_holders_busy\": \"{}\",", policy.when_holders_busy().as_str());
                    assert!(t.contains(&mode), "{policy}");
                }
                Policy::RoundRobin => assert!(t.contains("round_robin.v3.RoundRobin\n\n")),
                Policy::LeastRequest => assert!(t.contains("least_request.v3.LeastRequest\n\n")),
                Policy::RingHash | Policy::RingHashBounded => {
                    assert!(t.contains(
                        "hash_policy:\n                  - header: {header_name: x-fal-runner-hint}"
                    ));
                    assert_eq!(t.contains("hash_balance_factor: 150"), policy == Policy::RingHashBounded);
                }
            }
            // The poll cluster keeps its own policy.
            assert!(t.contains("x-hint-router-poll-target"));
            // The queue listener is plain HTTP; the HTTPS listener keeps its certificate.
            assert!(!t.contains("*dev_tls_socket"), "{policy}");
            assert!(t.contains("- transport_socket: &dev_tls_socket"), "{policy}");
            let queue = t.find("  - name: public_queue\n").unwrap();
            let listener = block_from(&t[queue..], "  - name: public_queue\n", 3).unwrap();
            assert!(listener.contains("    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n"));
            assert!(listener.contains("stat_prefix: public_queue"));
            assert_eq!(listener.contains("root_id: hint_router_queue"), policy.is_hint(), "{policy}");
        }
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

    #[test]
    fn block_from_stops_at_dedent_and_siblings() {
        let t = "a:\n  - x: 1\n    y: 2\n  - z: 3\nb: 4\n";
        assert_eq!(block_from(t, "  - x: 1\n", 2).unwrap(), "  - x: 1\n    y: 2\n");
        assert_eq!(block_from(t, "a:\n", 1).unwrap(), "a:\n  - x: 1\n    y: 2\n  - z: 3\n");
        assert!(block_from(t, "c:\n", 0).is_none());
    }
}
