//! Small helpers the test suites share: waiting with a deadline, Envoy's heap, and
//! validating a rendered config.

use crate::{client, envoy_bin, runner_bin, scratch_dir, Envoy};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it holds (returns how long that took) or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Bytes Envoy's heap has allocated (admin `/memory`), 0 if unreadable.
pub fn envoy_allocated(e: &Envoy) -> u64 {
    let text = client()
        .get(format!("http://127.0.0.1:{}/memory", e.admin))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    m["allocated"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Runs `envoy --mode validate` on the config `text`: whether Envoy accepted it, and what it
/// printed.
pub fn validate_config(name: &str, text: &str) -> (bool, String) {
    let cfg = scratch_dir(name).join("envoy.yaml");
    std::fs::write(&cfg, text).expect("write config");
    let out = std::process::Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(&cfg)
        .output()
        .expect("run envoy --mode validate");
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), log)
}

/// A fresh directory of `count` real model files (`make-models`, `size_mb` MiB each, named
/// `model-0..`), with their manifest, for runners started with `--backend cpu`.
pub fn make_models(count: usize, size_mb: usize) -> std::path::PathBuf {
    let dir = scratch_dir("models");
    let make_models = runner_bin().with_file_name("make-models");
    let made = std::process::Command::new(&make_models)
        .arg("--dir")
        .arg(&dir)
        .args(["--count", &count.to_string(), "--size-mb", &size_mb.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", make_models.display()));
    assert!(made.success(), "make-models failed");
    dir
}
