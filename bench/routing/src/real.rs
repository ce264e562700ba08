//! The same traces through a real Envoy and real `runner-example` processes on 127.0.0.1.
//!
//! For one point every policy gets its own stack (its own runners and its own Envoy, rendered
//! from the shipped `envoy/envoy.yaml` by the e2e harness) and all stacks are fed the same
//! trace at the same time, so that machine noise hits every policy alike. Requests are sent
//! open loop at their scheduled times; latency counts from the scheduled time.

use crate::report::{quantile, Record, Status};
use crate::sim::Policy;
use crate::workload::{model_name, Trace};
use anyhow::{anyhow, bail, Context, Result};
use hint_router_e2e::{runner_bin, Envoy, EnvoyOptions};
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
    let mut edits = Vec::new();
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

/// One policy's stack: its runners and its Envoy.
pub struct Stack {
    /// Which policy.
    pub policy: Policy,
    // Envoy first: dropped (killed) before the runners.
    envoy: Envoy,
    runners: Vec<BenchRunner>,
}

impl Stack {
    /// Starts `n` runners and an Envoy configured for `policy`.
    pub fn start(
        policy: Policy,
        n: usize,
        runner_args: &[String],
        envoy_concurrency: u32,
        hash_balance_factor: u32,
    ) -> Result<Stack> {
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
        Ok(Stack { policy, envoy, runners })
    }

    /// The runners' addresses, in config order.
    pub fn addrs(&self) -> Vec<String> {
        self.runners.iter().map(|r| r.addr.clone()).collect()
    }

    /// Loads started on all runners so far.
    pub fn loads(&self) -> u64 {
        self.runners.iter().map(BenchRunner::loads).sum()
    }

    /// Envoy's listener URL.
    pub fn url(&self) -> String {
        self.envoy.url()
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
}

async fn one_request(
    client: reqwest::Client,
    url: String,
    model: String,
    sched: Instant,
    timeout: Duration,
    addrs: Arc<Vec<String>>,
) -> (Record, u64) {
    let lag = Instant::now().saturating_duration_since(sched).as_micros() as u64;
    let body = format!("{{\"model\":\"{model}\",\"prompt\":\"hello\"}}");
    let fut = async {
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-fal-runner-hint", &model)
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (cache, runner) = (header("x-cache"), header("x-runner-id"));
        let overflow = header("x-envoy-overloaded").is_some();
        resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, cache, runner, overflow))
    };
    let result = tokio::time::timeout_at(sched + timeout, fut).await;
    let latency_us = Instant::now().saturating_duration_since(sched).as_micros() as u64;
    let mut rec = Record { latency_us, ..Record::default() };
    match result {
        Err(_) => {
            rec.status = Status::Timeout;
            rec.latency_us = timeout.as_micros() as u64;
        }
        Ok(Err(_)) => rec.status = Status::Error,
        Ok(Ok((status, cache, runner, overflow))) => {
            rec.status = match status {
                200 => Status::Ok,
                503 if overflow => Status::Overflow,
                _ => Status::Error,
            };
            rec.hit = cache.as_deref() == Some("hit");
            rec.runner = runner.and_then(|r| addrs.iter().position(|a| *a == r)).map(|i| i as u32);
        }
    }
    (rec, lag)
}

/// Sends `trace` to every stack at once (each request at its scheduled time to all of them)
/// and waits for all answers (each bounded by `timeout`).
pub async fn run_trace(stacks: &[Stack], trace: &Trace, timeout: Duration) -> Result<Vec<RealRun>> {
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let names: Vec<String> = (0..trace.spec.models as u32).map(model_name).collect();
    let targets: Vec<(String, Arc<Vec<String>>)> =
        stacks.iter().map(|s| (s.url(), Arc::new(s.addrs()))).collect();
    let n = trace.reqs.len();
    let mut handles: Vec<Vec<tokio::task::JoinHandle<(Record, u64)>>> =
        targets.iter().map(|_| Vec::with_capacity(n)).collect();
    let start = Instant::now() + Duration::from_millis(50);
    let w0 = start + Duration::from_micros(trace.spec.warmup_us);
    let w1 = w0 + Duration::from_micros(trace.spec.measure_us);
    let mut loads_at_w0: Option<Vec<u64>> = None;
    let mut loads_at_w1: Option<Vec<u64>> = None;
    for req in &trace.reqs {
        let sched = start + Duration::from_micros(req.at_us);
        if loads_at_w0.is_none() && sched >= w0 {
            tokio::time::sleep_until(w0).await;
            loads_at_w0 = Some(stacks.iter().map(Stack::loads).collect());
        }
        tokio::time::sleep_until(sched).await;
        let model = names.get(req.model as usize).cloned().unwrap_or_default();
        for ((url, addrs), hs) in targets.iter().zip(handles.iter_mut()) {
            hs.push(tokio::spawn(one_request(
                client.clone(),
                url.clone(),
                model.clone(),
                sched,
                timeout,
                Arc::clone(addrs),
            )));
        }
    }
    tokio::time::sleep_until(w1).await;
    loads_at_w1.get_or_insert_with(|| stacks.iter().map(Stack::loads).collect());
    let l0 = loads_at_w0.unwrap_or_else(|| vec![0; stacks.len()]);
    let l1 = loads_at_w1.unwrap_or_else(|| vec![0; stacks.len()]);
    let secs = trace.spec.measure_us as f64 / 1e6;
    let mut runs = Vec::with_capacity(stacks.len());
    for (k, hs) in handles.into_iter().enumerate() {
        let mut records = Vec::with_capacity(n);
        let mut lags = Vec::with_capacity(n);
        let mut sent_in_window = 0u64;
        for (i, h) in hs.into_iter().enumerate() {
            let (rec, lag) = h.await.context("request task failed")?;
            if i >= trace.first_measured {
                lags.push(lag);
                sent_in_window += 1;
            }
            records.push(rec);
        }
        lags.sort_unstable();
        runs.push(RealRun {
            records,
            loads_in_window: l1.get(k).copied().unwrap_or(0).saturating_sub(l0.get(k).copied().unwrap_or(0)),
            achieved_rps: sent_in_window as f64 / secs,
            send_lag_p99_ms: quantile(&lags, 0.99) as f64 / 1000.0,
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
        }
    }

    #[test]
    fn block_from_stops_at_dedent_and_siblings() {
        let t = "a:\n  - x: 1\n    y: 2\n  - z: 3\nb: 4\n";
        assert_eq!(block_from(t, "  - x: 1\n", 2).unwrap(), "  - x: 1\n    y: 2\n");
        assert_eq!(block_from(t, "a:\n", 1).unwrap(), "a:\n  - x: 1\n    y: 2\n  - z: 3\n");
        assert!(block_from(t, "c:\n", 0).is_none());
    }
}
