//! Test harness: starts real runner processes and a real Envoy (with a shipped config, ports
//! rewritten) on 127.0.0.1, waits for readiness with deadlines, dumps Envoy's log when a test
//! fails, and kills every process it started on drop.
//!
//! Two configs ship: `envoy/envoy.yaml` (production: no debug headers, runner headers stripped
//! from responses) and `envoy/demo.yaml` (the same plus [`DEMO_EDITS`]: debug headers on,
//! `x-cache` and `x-fal-runner-hints` left on responses). Tests render the demo config by
//! default because they need to see where each request went ([`Answer::upstream`],
//! [`Answer::cache`]); [`EnvoyOptions::production`] renders the production one. Setting
//! `E2E_ENVOY_CONFIG=FILE` makes every test render FILE instead (e.g. an older config, to
//! check that a regression test fails against it).
//!
//! Used by the end-to-end tests in `tests/tests/` and by the benchmarks.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod configs;
pub mod fake;
pub mod python;
pub mod util;

pub use configs::{DEMO_CONFIG, DEMO_EDITS, EDS_CONFIG, EDS_EDITS, PRODUCTION_CONFIG};

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/bin/envoy` (installed by `scripts/setup.sh`).
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("ENVOY_BIN").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv/bin/envoy"))
}

/// The filter module built by `make build`.
pub fn wasm_path() -> PathBuf {
    repo_root().join("target/wasm32-wasip1/release/hint_router.wasm")
}

/// The runner binary built by `make build`: `$RUNNER_BIN`, else `target/release/runner-example`.
pub fn runner_bin() -> PathBuf {
    std::env::var_os("RUNNER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/runner-example"))
}

/// `n` distinct free loopback ports. All are held bound at once while they are picked: ports
/// picked one after another can repeat (one is released before the next is asked for), and a
/// process that then binds the second of two equal ports fails, while a readiness probe on it
/// is answered by the first.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    held.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// A scratch directory under `target/e2e/`, unique per call.
pub fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = repo_root().join("target/e2e").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Sends `sig` to a process we started.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we own; no memory is shared.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A runner process on 127.0.0.1 with a kernel-chosen port.
pub struct Runner {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The runner's log (stderr).
    pub log: PathBuf,
}

impl Runner {
    /// Starts `runner-example --listen 127.0.0.1:0 <args>` and waits for its `listening on`.
    pub fn start(args: &[&str]) -> Runner {
        Self::start_at("127.0.0.1:0", args)
    }

    /// Starts a runner on a given address (used to restart one on its old port).
    pub fn start_at(listen: &str, args: &[&str]) -> Runner {
        let bin = runner_bin();
        assert!(bin.exists(), "{} missing: run `make build` first", bin.display());
        let log = scratch_dir("runner").join("runner.log");
        let mut child = Command::new(&bin)
            .arg("--listen")
            .arg(listen)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).expect("runner log"))
            .spawn()
            .expect("spawn runner");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => Runner { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                panic!("runner did not report its address within 20 s");
            }
        }
    }

    /// The runner's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The runner's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the runner and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (SIGSTOP, SIGCONT, SIGTERM...).
    pub fn signal(&self, sig: i32) {
        signal(self.child.id(), sig);
    }

    /// Waits for the process to exit, up to `limit`; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `GET /hints` straight from the runner.
    pub fn hints(&self) -> Option<hint_router_core::wire::HintsReport> {
        let r = client().get(format!("http://{}/hints", self.addr)).send().ok()?;
        serde_json::from_slice(&r.bytes().ok()?).ok()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGCONT);
        self.kill();
        if std::thread::panicking() {
            print_log_tail(&format!("runner {}", self.addr), &self.log_text());
        }
    }
}

/// Prints the last 30 lines of a child process's `log` under a `what` heading (from `Drop`
/// impls while a test panics, so a failure shows what the process said).
pub fn print_log_tail(what: &str, log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    eprintln!("---- {what} log (last lines) ----");
    for l in tail.iter().rev() {
        eprintln!("{l}");
    }
}

/// Options for the generated Envoy config.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    /// Extra plugin config members, e.g. `("debug_headers", "false")` (JSON values);
    /// they replace members of the same name in the shipped config.
    pub plugin: Vec<(String, String)>,
    /// The config file to render (relative to the repo root): `envoy/demo.yaml` by default,
    /// `envoy/envoy.yaml` with [`EnvoyOptions::production`]. `$E2E_ENVOY_CONFIG` overrides it.
    pub config_file: String,
    /// Text replacements applied after the standard rewrites.
    pub replace: Vec<(String, String)>,
    /// Blocks removed after the standard rewrites: each from its start marker (included) to
    /// the first end marker after it (kept). Unlike [`Self::replace`], a block may contain
    /// text the rewrites change (ports).
    pub cut: Vec<(String, String)>,
    /// Use the shipped ports (listener 10000, admin 9901) instead of free ones.
    pub shipped_ports: bool,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            concurrency: 2,
            plugin: Vec::new(),
            config_file: DEMO_CONFIG.into(),
            replace: Vec::new(),
            cut: Vec::new(),
            shipped_ports: false,
        }
    }
}

impl EnvoyOptions {
    /// The production config (`envoy/envoy.yaml`): no debug headers, and no runner header
    /// (`x-cache`, `x-fal-runner-hints`, `x-runner-id`) reaches clients, so [`Answer::upstream`]
    /// and [`Answer::cache`] stay empty.
    pub fn production() -> EnvoyOptions {
        EnvoyOptions { config_file: PRODUCTION_CONFIG.into(), ..EnvoyOptions::default() }
    }

    /// The file actually rendered: `$E2E_ENVOY_CONFIG` when set, else [`Self::config_file`].
    pub fn effective_config_file(&self) -> PathBuf {
        match std::env::var_os("E2E_ENVOY_CONFIG") {
            Some(f) => repo_root().join(PathBuf::from(f)),
            None => repo_root().join(&self.config_file),
        }
    }
}

/// Where `scripts/dev-tls.sh` (run by setup) writes the development certificate.
pub fn dev_tls_dir() -> PathBuf {
    repo_root().join("target/dev-tls")
}

/// Writes the development certificate if it is missing (a test run without `scripts/setup.sh`):
/// the shipped configs' TLS listener does not start without it.
pub fn ensure_dev_tls() {
    if dev_tls_dir().join("cert.pem").exists() && dev_tls_dir().join("key.pem").exists() {
        return;
    }
    let st = Command::new(repo_root().join("scripts/dev-tls.sh")).status().expect("run scripts/dev-tls.sh");
    assert!(st.success(), "scripts/dev-tls.sh failed: {st}");
}

/// Shipped demo addresses that the harness rewrites.
const SHIPPED_RUNNERS: [&str; 3] = ["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"];

/// Renders the shipped config for these runners and ports.
pub fn render_config(runners: &[String], listen: u16, admin: u16, opts: &EnvoyOptions) -> String {
    render_config_tls(runners, listen, admin, (10443, 10444), opts)
}

/// [`render_config`] with the TLS listeners on `(tls, queue)` (shipped on 10443 and 10444:
/// fal's blocking calls and fal's queue), and the development certificate's paths made
/// absolute.
pub fn render_config_tls(
    runners: &[String],
    listen: u16,
    admin: u16,
    (tls, queue): (u16, u16),
    opts: &EnvoyOptions,
) -> String {
    let file = opts.effective_config_file();
    let mut text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    // Endpoints: the shipped config lists three; generate as many as there are runners.
    let endpoint_line = |addr: &str| {
        let sa: SocketAddr = addr.parse().expect("runner addr");
        format!(
            "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
            sa.ip(),
            sa.port()
        )
    };
    let shipped: String = SHIPPED_RUNNERS.iter().map(|a| endpoint_line(a)).collect();
    let ours: String = runners.iter().map(|a| endpoint_line(a)).collect();
    // Configs whose runners come from EDS (envoy/eds.yaml) have no static block.
    assert!(
        text.contains(&shipped) || text.contains("type: EDS"),
        "shipped endpoint block not found in {}",
        file.display()
    );
    text = text.replace(&shipped, &ours);
    let shipped_list = SHIPPED_RUNNERS.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    let our_list = runners.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    // Older configs list the runners in the plugin config; the shipped ones read the cluster.
    text = text.replace(&shipped_list, &our_list);
    text = text.replace("port_value: 10000", &format!("port_value: {listen}"));
    text = text.replace("port_value: 9901", &format!("port_value: {admin}"));
    text = text.replace("port_value: 10443", &format!("port_value: {tls}"));
    text = text.replace("port_value: 10444", &format!("port_value: {queue}"));
    text = text.replace("filename: target/dev-tls/", &format!("filename: {}/", dev_tls_dir().display()));
    text = text.replace(
        "filename: target/wasm32-wasip1/release/hint_router.wasm",
        &format!("filename: {}", wasm_path().display()),
    );
    if !opts.plugin.is_empty() {
        text = override_plugin_config(&text, &opts.plugin);
    }
    for (from, to) in &opts.replace {
        assert!(text.contains(from.as_str()), "replacement target {from:?} not in config");
        text = text.replace(from.as_str(), to);
    }
    for (start, end) in &opts.cut {
        let s = text.find(start.as_str()).unwrap_or_else(|| panic!("cut start {start:?} not in config"));
        let len =
            text[s..].find(end.as_str()).unwrap_or_else(|| panic!("cut end {end:?} not after {start:?}"));
        text.replace_range(s..s + len, "");
    }
    text
}

/// Replaces members of the plugin configuration JSON (the `value: |` block) in `text`.
fn override_plugin_config(text: &str, members: &[(String, String)]) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start =
        lines.iter().position(|l| l.trim_end().ends_with("value: |")).expect("plugin config block") + 1;
    let indent = lines[start].len() - lines[start].trim_start().len();
    let end = (start..lines.len())
        .find(|&i| lines[i].trim() == "}" && lines[i].len() - lines[i].trim_start().len() == indent)
        .expect("end of plugin config");
    let json: String = lines[start..=end].join("\n");
    let mut cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&json).expect("plugin config json");
    for (k, v) in members {
        cfg.insert(k.clone(), serde_json::from_str(v).expect("override value json"));
    }
    let mut out: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    out.push(format!("{}{}", " ".repeat(indent), serde_json::Value::Object(cfg)));
    out.extend(lines[end + 1..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    /// Public listener port.
    pub port: u16,
    /// Admin port.
    pub admin: u16,
    /// HTTPS listener port (fal_client's door; shipped as 10443).
    pub tls_port: u16,
    /// HTTPS listener port of fal's queue (`FAL_QUEUE_RUN_HOST`; shipped as 10444).
    pub queue_port: u16,
    log: PathBuf,
    /// Directory holding the config and log.
    pub dir: PathBuf,
}

impl Envoy {
    /// Starts Envoy for `runners` and waits until it is ready and its poller has seen
    /// `expect_available` runners (pass 0 to skip that wait).
    pub fn start(runners: &[String], opts: &EnvoyOptions, expect_available: u64) -> Envoy {
        let bin = envoy_bin();
        assert!(bin.exists(), "{} missing: run `scripts/setup.sh` (or `make test`) first", bin.display());
        assert!(wasm_path().exists(), "{} missing: run `make build` first", wasm_path().display());
        let (port, admin, tls_port, queue_port) = if opts.shipped_ports {
            (10000, 9901, 10443, 10444)
        } else {
            let p = free_ports(4);
            (p[0], p[1], p[2], p[3])
        };
        ensure_dev_tls();
        let dir = scratch_dir("envoy");
        let cfg = dir.join("envoy.yaml");
        fs::write(&cfg, render_config_tls(runners, port, admin, (tls_port, queue_port), opts))
            .expect("write config");
        let log = dir.join("envoy.log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", &opts.concurrency.to_string()])
            .args(["--base-id", &admin.to_string()])
            .args(["-l", "info", "--log-path"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn envoy");
        let mut e = Envoy { child, port, admin, tls_port, queue_port, log, dir };
        e.wait_ready(Duration::from_secs(60));
        if expect_available > 0 {
            e.wait_stat("wasmcustom.hint_router.runners_available", Duration::from_secs(30), |v| {
                v == expect_available
            });
        }
        e
    }

    fn wait_ready(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("envoy exited early ({st}); log:\n{}", self.log_text());
            }
            if let Ok(r) = client().get(format!("http://127.0.0.1:{}/ready", self.admin)).send() {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("envoy not ready within {limit:?}; log:\n{}", self.log_text());
    }

    /// Base URL of the public listener.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// Envoy's log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// One stat's value (counters and gauges), `None` if absent.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let body = client()
            .get(format!("http://127.0.0.1:{}/stats?filter=^{}$", self.admin, name.replace('.', "\\.")))
            .send()
            .ok()?
            .text()
            .ok()?;
        body.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
    }

    /// Waits until `pred(stat)` holds.
    pub fn wait_stat(&self, name: &str, limit: Duration, pred: impl Fn(u64) -> bool) -> u64 {
        let end = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < end {
            last = self.stat(name);
            if let Some(v) = last {
                if pred(v) {
                    return v;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("stat {name} stuck at {last:?} after {limit:?}; log:\n{}", self.log_text());
    }

    /// VM reload activity of both plugins (`vm_reload`, `_success`, `_failure`, `_backoff`):
    /// non-zero once any hint-router VM has failed.
    pub fn vm_reloads(&self) -> u64 {
        let mut n = 0;
        for plugin in ["hint_router", "hint_router_poller"] {
            for suffix in ["", "_success", "_failure", "_backoff"] {
                n += self.stat(&format!("wasm.{plugin}.vm_reload{suffix}")).unwrap_or(0);
            }
        }
        n
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- envoy log ({}) ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// A blocking HTTP client that opens a new connection per request, so requests spread over
/// Envoy's workers as independent clients' would.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// One inference answer as seen by a test.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `x-hint-router-upstream` (debug header): the runner that answered.
    pub upstream: String,
    /// `x-hint-router-decision` (debug header).
    pub decision: String,
    /// `x-cache` from the runner.
    pub cache: String,
    /// Response body.
    pub body: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Sends `POST /` for `model`, with the hint header set to `hint` (raw bytes) when given.
pub fn infer(url: &str, model: &str, hint: Option<&[u8]>, extra: &[(&str, &str)]) -> Answer {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::json!({"model": model, "prompt": "hello"}).to_string());
    if let Some(h) = hint {
        req = req
            .header("x-fal-runner-hint", reqwest::header::HeaderValue::from_bytes(h).expect("header value"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let t = Instant::now();
    match req.send() {
        Ok(r) => {
            let h = |n: &str| {
                r.headers()
                    .get(n)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default()
            };
            let (upstream, decision, cache) =
                (h("x-hint-router-upstream"), h("x-hint-router-decision"), h("x-cache"));
            let status = r.status().as_u16();
            let body = r.text().unwrap_or_default();
            Answer { status, upstream, decision, cache, body, elapsed: t.elapsed() }
        }
        Err(e) => Answer {
            status: 0,
            upstream: String::new(),
            decision: String::new(),
            cache: String::new(),
            body: e.to_string(),
            elapsed: t.elapsed(),
        },
    }
}

/// Three (or `n`) runners and an Envoy in front of them.
pub struct Stack {
    /// The runners, in config order.
    pub runners: Vec<Runner>,
    /// Envoy.
    pub envoy: Envoy,
}

impl Stack {
    /// Starts `n` runners with `runner_args` and Envoy with `opts`; waits until all are
    /// available to the filter.
    pub fn start(n: usize, runner_args: &[&str], opts: &EnvoyOptions) -> Stack {
        let runners: Vec<Runner> = (0..n).map(|_| Runner::start(runner_args)).collect();
        let addrs: Vec<String> = runners.iter().map(|r| r.addr.clone()).collect();
        let envoy = Envoy::start(&addrs, opts, n as u64);
        Stack { runners, envoy }
    }

    /// Index of the runner at `addr`.
    pub fn index_of(&self, addr: &str) -> Option<usize> {
        self.runners.iter().position(|r| r.addr == addr)
    }
}

/// Closed-loop hinted load for fault tests: `clients` threads, each sending `POST /` for
/// `model-0..model-{models-1}` in turn (hinted), until [`SteadyLoad::stop`].
pub struct SteadyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<(Instant, Answer)>>>,
}

impl SteadyLoad {
    /// Starts the clients against `url`.
    pub fn start(url: &str, clients: usize, models: usize) -> SteadyLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..clients)
            .map(|c| {
                let (u, stop) = (url.to_string(), stop.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let m = format!("model-{}", (c + i) % models.max(1));
                        out.push((Instant::now(), infer(&u, &m, Some(m.as_bytes()), &[])));
                        i += 1;
                    }
                    out
                })
            })
            .collect();
        SteadyLoad { stop, handles }
    }

    /// Stops the clients; every answer with the time its request was sent.
    pub fn stop(self) -> Vec<(Instant, Answer)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    }
}
