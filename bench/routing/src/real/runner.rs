//! The bench's runner process: a `runner-example` that counts the model loads it starts.

use anyhow::{bail, Context, Result};
use hint_router_e2e::runner_bin;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

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
