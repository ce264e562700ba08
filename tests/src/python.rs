//! Python processes for the fal tests (`tests/tests/fal.rs`): real `fal.App` runners served on
//! 127.0.0.1 by `tests/fal/app.py`, and the real `fal_client` driven by `tests/fal/client.py`,
//! both with the interpreter in `.venv/` (fal and fal-client installed, pinned, by
//! `scripts/setup.sh --test`).

use crate::{client, free_ports, repo_root, signal, Envoy};
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The interpreter: `$PYTHON_BIN`, else `.venv/bin/python`.
pub fn python_bin() -> PathBuf {
    std::env::var_os("PYTHON_BIN").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Panics with the fix when fal or fal_client cannot be imported.
fn check_fal_installed() {
    let ok = Command::new(python_bin())
        .args(["-c", "import fal, fal_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "fal / fal_client missing in {}: run `scripts/setup.sh --test`", python_bin().display());
}

/// A `fal.App` runner (`tests/fal/app.py`) on 127.0.0.1; killed on drop.
pub struct FalApp {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The name it answers with (`"runner"` in its JSON answers).
    pub name: String,
    log: PathBuf,
}

impl FalApp {
    /// Starts every `(name, args)` app at once and waits until all answer `GET /health`.
    pub fn start_all(specs: &[(&str, &[&str])]) -> Vec<FalApp> {
        check_fal_installed();
        // Distinct ports: each app binds its own only once its interpreter has started.
        let ports = free_ports(specs.len());
        let mut apps: Vec<FalApp> =
            specs.iter().zip(ports).map(|((name, args), port)| FalApp::spawn(name, args, port)).collect();
        for a in &mut apps {
            a.wait_ready(Duration::from_secs(60));
        }
        apps
    }

    fn spawn(name: &str, args: &[&str], port: u16) -> FalApp {
        let dir = crate::scratch_dir("fal-app");
        let log = dir.join(format!("{name}.log"));
        let err = fs::File::create(&log).expect("log file");
        let child = Command::new(python_bin())
            .arg(repo_root().join("tests/fal/app.py"))
            .args(["--port", &port.to_string(), "--name", name])
            .args(args)
            .stdout(err.try_clone().expect("log file"))
            .stderr(err)
            .spawn()
            .expect("spawn python");
        FalApp { child, addr: format!("127.0.0.1:{port}"), name: name.to_string(), log }
    }

    fn wait_ready(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("fal app {} exited early ({st}); log:\n{}", self.name, self.log_text());
            }
            if let Ok(r) = client().get(format!("http://{}/health", self.addr)).send() {
                if r.status().is_success() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("fal app {} not ready within {limit:?}; log:\n{}", self.name, self.log_text());
    }

    /// The app's output so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILLs the app and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `POST /` straight to the app (no Envoy): its JSON answer.
    pub fn infer(&self, model: &str, sleep_ms: u64) -> serde_json::Value {
        let body = serde_json::json!({"model": model, "sleep_ms": sleep_ms}).to_string();
        let r = client()
            .post(format!("http://{}/", self.addr))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("fal app answers");
        serde_json::from_str(&r.text().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for FalApp {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGCONT);
        self.kill();
        if std::thread::panicking() {
            crate::print_log_tail(&format!("fal app {} ({})", self.name, self.addr), &self.log_text());
        }
    }
}

/// Runs `calls` (see `tests/fal/client.py`) with the real `fal_client` against `envoy`'s TLS
/// listener (`FAL_RUN_HOST`, `SSL_CERT_FILE` = the development certificate, a made-up
/// `FAL_KEY`); one JSON answer per call.
pub fn fal_client_calls(envoy: &Envoy, app: &str, calls: &serde_json::Value) -> Vec<serde_json::Value> {
    drive_fal_client("tests/fal/client.py", envoy, app, calls)
}

/// Runs queue `steps` (see `tests/fal/queue_client.py`) with the real `fal_client` against
/// `envoy`'s queue listener (`FAL_QUEUE_RUN_HOST`); one JSON answer per step.
pub fn fal_queue_steps(envoy: &Envoy, app: &str, steps: &serde_json::Value) -> Vec<serde_json::Value> {
    drive_fal_client("tests/fal/queue_client.py", envoy, app, steps)
}

fn drive_fal_client(
    script: &str,
    envoy: &Envoy,
    app: &str,
    steps: &serde_json::Value,
) -> Vec<serde_json::Value> {
    check_fal_installed();
    let dir = crate::scratch_dir("fal-client");
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(python_bin())
        .arg(repo_root().join(script))
        .arg(app)
        .arg(steps.to_string())
        .env("FAL_RUN_HOST", format!("127.0.0.1:{}", envoy.tls_port))
        .env("FAL_QUEUE_RUN_HOST", format!("127.0.0.1:{}", envoy.queue_port))
        .env("SSL_CERT_FILE", crate::dev_tls_dir().join("cert.pem"))
        .env("FAL_KEY", "test-key-id:test-key-secret")
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("run fal_client");
    // fal_client retries connection errors with backoff for minutes: bound the whole run.
    let limit = Duration::from_secs(90);
    let end = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "fal_client driver failed or ran over {limit:?} ({status:?}):\n{stdout}\n{stderr}"
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("driver prints JSON"))
        .collect()
}
