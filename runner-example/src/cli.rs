//! Command-line options.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::backend::{Backend, SimBackend};
use crate::cpu::CpuBackend;
use crate::queue::{QueueConfig, DEFAULT_JOB_TTL, DEFAULT_MAX_FINISHED_JOBS};
use crate::runner::{RunnerConfig, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE};

/// Example model runner for hint-router.
///
/// Serves inference over HTTP from a bounded cache of models, and reports the models it
/// holds (`GET /hints`, and the `x-fal-runner-hints` header on every response) so that
/// hint-router can send each request to a runner that already has its model.
///
/// On SIGTERM or SIGINT it drains: it stops advertising hints, fails `/healthz`, stops
/// accepting connections, finishes the requests in progress and exits (0 once they are done,
/// 1 when --drain-timeout-ms runs out first). A second signal exits at once.
///
/// It also serves fal's queue (docs/queue.md; --no-queue turns it off): `POST
/// /queue/submit` takes a job and answers at once with a request id, whose status, result and
/// cancel calls it then serves. A job holds a request's place (--max-queue) until it ends.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "runner-example", version)]
pub struct Args {
    /// Address to listen on, `IP:PORT`. Port 0 picks a free port; the address bound is
    /// printed to stdout as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:18081", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Identity to report in `x-runner-id` and `/hints` (the address routers reach this
    /// runner at); defaults to the address actually bound.
    #[arg(long, value_name = "ADDR", value_parser = parse_advertise)]
    pub advertise: Option<String>,

    /// How many models the cache holds at most; the least recently used unpinned one is
    /// evicted to make room.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,

    /// How many inferences run at once; further requests wait in arrival order.
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrency: u32,

    /// How many requests may wait (for a model load or an inference slot) beside the
    /// --max-concurrency running ones. A request beyond is answered at once, before its
    /// body is read, with 429, `retry-after: 1` and `x-runner-overloaded: queue-full`;
    /// nothing of it ran, so a router may send it to another runner. An inference whose
    /// client went away keeps its place until it has really ended.
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUE, value_name = "N")]
    pub max_queue: u32,

    /// How many connections are open at once at most; one more is closed as soon as it is
    /// accepted, unread.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Model backend. `sim` simulates loads and inferences with sleeps of --load-ms and
    /// --infer-ms, and fails to load any model whose name starts with `fail-`. `cpu` serves
    /// the models of --models-dir from host memory; `cuda` (built with `--features cuda`)
    /// from the memory of GPU --device.
    #[arg(long, value_enum, default_value_t = BackendKind::Sim)]
    pub backend: BackendKind,

    /// Directory of the models to serve (`cpu`, `cuda`): safetensors files and the
    /// `manifest.json` listing them, as `make-models --dir DIR` writes them. The manifest is
    /// read once, at start.
    #[arg(long, value_name = "DIR",
          required_if_eq_any([("backend", "cpu"), ("backend", "cuda")]))]
    pub models_dir: Option<PathBuf>,

    /// GPU to hold the models in (`cuda`), as CUDA numbers them.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub device: usize,

    /// Memory budget of the cache, in MiB: besides --capacity, the models held (resident
    /// and loading) take at most this much together; least recently used unpinned models are
    /// evicted to make room. A model bigger than the whole budget is answered with 507.
    /// Model sizes come from the manifest (`cpu`, `cuda`) or --sim-model-mb (`sim`).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_mb: Option<u64>,

    /// Warm tier, in MiB (`cpu`, `cuda`): verified weights of the models loaded last stay in
    /// host memory (pinned, for `cuda`) up to this much, resident ones included, so a model
    /// evicted from the device loads again with a copy instead of a disk read and checks.
    /// Listed as `warm` in /hints. The `cpu` backend then models a device (a second copy).
    #[arg(long, value_name = "MIB")]
    pub host_cache_mb: Option<u64>,

    /// Threads that hash and check a model file loaded in full (`cpu`, `cuda`): its first
    /// load, or one after the file changed. They run at the load thread's lowered priority,
    /// hashing (BLAKE3) and checking one piece of the file while the load thread reads the
    /// next. 1: the load thread does it all, on one core. [default: the number of CPUs]
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub load_threads: Option<usize>,

    /// Size every model claims in the sim backend, in MiB (reported as `resident_bytes` and
    /// counted against --memory-mb); without it sim models have no size.
    #[arg(long, value_name = "MIB")]
    pub sim_model_mb: Option<u64>,

    /// How long loading a model takes in the sim backend, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub load_ms: u64,

    /// How long one inference takes in the sim backend, in milliseconds.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub infer_ms: u64,

    /// How long, after a model failed to load, requests for it fail at once (503) before
    /// the next one tries loading it again, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub load_fail_backoff_ms: u64,

    /// How long draining may take after SIGTERM/SIGINT before the runner exits anyway,
    /// cutting off the requests still in progress, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub drain_timeout_ms: u64,

    /// On SIGTERM/SIGINT, how long to keep serving while reporting `draining` (no hints,
    /// `/healthz` 503) before closing the listener, so routers polling `/hints` stop sending
    /// new requests first, in milliseconds. Keep it above the router's poll interval.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub drain_grace_ms: u64,

    /// Serve no fal queue: no `queue_token` in /hints, and the `/queue/...` routes (job
    /// submissions, status, result, cancel; see docs/queue.md) answer 404.
    #[arg(long)]
    pub no_queue: bool,

    /// How long a finished queue job's status and result are kept, in seconds.
    #[arg(long, default_value_t = DEFAULT_JOB_TTL.as_secs(), value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub job_ttl_s: u64,

    /// How many finished queue jobs are kept at most; beyond, the oldest is dropped first.
    /// (Pending jobs are bounded by --max-concurrency + --max-queue: each holds a request's
    /// place.)
    #[arg(long, default_value_t = DEFAULT_MAX_FINISHED_JOBS, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_finished_jobs: usize,
}

/// `mb` MiB in bytes.
fn mib(mb: u64) -> u64 {
    mb.saturating_mul(1 << 20)
}

/// The model backends available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Simulated: sleeps instead of loading and computing.
    Sim,
    /// Real weights in host memory, f32 inference on the CPU.
    Cpu,
    /// Real weights in GPU memory, inference with cuBLAS (needs the `cuda` cargo feature,
    /// an NVIDIA driver and cuBLAS).
    Cuda,
}

impl BackendKind {
    /// The name as on the command line: `sim`, `cpu` or `cuda`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn parse_advertise(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("must be non-empty visible ASCII without spaces".to_string());
    }
    Ok(s.to_string())
}

impl Args {
    /// The runner configuration, given the identity to advertise when `--advertise` is
    /// absent (the bound address).
    pub fn runner_config(&self, bound: SocketAddr) -> RunnerConfig {
        RunnerConfig {
            advertise: self.advertise.clone().unwrap_or_else(|| bound.to_string()),
            capacity: self.capacity,
            max_concurrency: self.max_concurrency,
            max_queue: self.max_queue,
            max_connections: self.max_connections,
            load_fail_backoff: Duration::from_millis(self.load_fail_backoff_ms),
            memory_budget_bytes: self.memory_mb.map(mib),
            queue: (!self.no_queue).then(|| QueueConfig {
                job_ttl: Duration::from_secs(self.job_ttl_s),
                max_finished_jobs: self.max_finished_jobs,
            }),
        }
    }

    /// Opens the backend chosen: reads the manifest of --models-dir (`cpu`, `cuda`), opens
    /// the GPU (`cuda`). Blocking. Fails with a message for people.
    pub fn backend(&self) -> Result<Arc<dyn Backend>, String> {
        match self.backend {
            BackendKind::Sim => Ok(Arc::new(
                SimBackend::new(Duration::from_millis(self.load_ms), Duration::from_millis(self.infer_ms))
                    .with_model_bytes(self.sim_model_mb.map(mib)),
            )),
            BackendKind::Cpu => {
                let backend = CpuBackend::open(self.models_dir()?)?
                    .with_host_cache(self.host_cache_mb.map(mib))
                    .with_load_threads(self.load_threads());
                log::info!(
                    "cpu backend: {} model(s) in {}, {} load-check thread(s)",
                    backend.models().len(),
                    backend.models().dir().display(),
                    backend.models().checks().threads()
                );
                Ok(Arc::new(backend))
            }
            BackendKind::Cuda => self.cuda_backend(),
        }
    }

    /// Threads that check a full load: --load-threads, or as many as the CPUs.
    pub fn load_threads(&self) -> usize {
        self.load_threads.unwrap_or_else(crate::weights::default_load_threads)
    }

    fn models_dir(&self) -> Result<&PathBuf, String> {
        self.models_dir.as_ref().ok_or_else(|| format!("--backend {} needs --models-dir", self.backend))
    }

    #[cfg(feature = "cuda")]
    fn cuda_backend(&self) -> Result<Arc<dyn Backend>, String> {
        let backend = crate::cuda::CudaBackend::open(self.models_dir()?, self.device)?
            .with_host_cache(self.host_cache_mb.map(mib))
            .with_load_threads(self.load_threads());
        let (name, free, total) = backend.device_info()?;
        log::info!(
            "cuda backend: {} model(s) in {}, GPU {} ({name}): {} MiB free of {} MiB",
            backend.models().len(),
            backend.models().dir().display(),
            self.device,
            free >> 20,
            total >> 20
        );
        if let Some(budget) = self.memory_mb.map(mib) {
            if budget > free as u64 {
                log::warn!("--memory-mb {} is more than the GPU's free memory", budget >> 20);
            }
        }
        Ok(Arc::new(backend))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda_backend(&self) -> Result<Arc<dyn Backend>, String> {
        Err("this runner-example was built without CUDA support: build it with \
             `cargo build --release -p runner-example --features cuda`"
            .to_string())
    }

    /// How long draining may take.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// How long to advertise draining before closing the listener.
    pub fn drain_grace(&self) -> Duration {
        Duration::from_millis(self.drain_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let args = Args::try_parse_from(["runner-example"]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:18081".parse().unwrap());
        assert_eq!(args.capacity, 3);
        assert_eq!(args.max_concurrency, 4);
        assert_eq!(args.max_queue, 64);
        assert_eq!(args.max_connections, 1024);
        assert_eq!(args.load_ms, 2000);
        assert_eq!(args.infer_ms, 50);
        assert_eq!(args.load_fail_backoff_ms, 1000);
        assert_eq!(args.drain_timeout(), Duration::from_secs(30));
        assert_eq!(args.backend, BackendKind::Sim);
        let config = args.runner_config("127.0.0.1:5".parse().unwrap());
        assert_eq!(config.advertise, "127.0.0.1:5");
        assert_eq!(config.load_fail_backoff, Duration::from_secs(1));
        assert_eq!(config.memory_budget_bytes, None);
        assert_eq!(args.models_dir, None);
        assert_eq!(args.device, 0);
        assert_eq!(args.sim_model_mb, None);
        assert_eq!(args.host_cache_mb, None);
        assert_eq!(args.load_threads, None);
        assert_eq!(args.load_threads(), crate::weights::default_load_threads());
        assert_eq!(config.queue, Some(QueueConfig::default()));
    }

    #[test]
    fn real_backend_flags() {
        let args = Args::try_parse_from([
            "runner-example",
            "--backend",
            "cpu",
            "--models-dir",
            "/nonexistent/models",
            "--memory-mb",
            "3",
            "--device",
            "1",
            "--load-threads",
            "3",
        ])
        .unwrap();
        assert_eq!(args.backend, BackendKind::Cpu);
        assert_eq!(args.load_threads(), 3);
        assert_eq!(args.models_dir, Some(PathBuf::from("/nonexistent/models")));
        assert_eq!(args.device, 1);
        let config = args.runner_config("127.0.0.1:5".parse().unwrap());
        assert_eq!(config.memory_budget_bytes, Some(3 << 20));
        // No manifest there: a clear error, not a panic.
        let err = args.backend().err().unwrap();
        assert!(err.contains("/nonexistent/models/manifest.json"), "{err}");
    }

    #[test]
    fn sim_models_can_claim_a_size() {
        let args = Args::try_parse_from(["runner-example", "--sim-model-mb", "2"]).unwrap();
        let backend = args.backend().unwrap();
        assert_eq!(backend.size_hint("m"), Some(2 << 20));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let args =
            Args::try_parse_from(["runner-example", "--backend", "cuda", "--models-dir", "/tmp"]).unwrap();
        let err = args.backend().err().unwrap();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn flags() {
        let args = Args::try_parse_from([
            "runner-example",
            "--listen",
            "127.0.0.1:0",
            "--advertise",
            "10.0.0.1:80",
            "--capacity",
            "5",
            "--max-concurrency",
            "2",
            "--backend",
            "sim",
            "--load-ms",
            "1",
            "--infer-ms",
            "2",
            "--drain-timeout-ms",
            "3",
            "--load-fail-backoff-ms",
            "4",
            "--max-queue",
            "0",
            "--max-connections",
            "7",
            "--job-ttl-s",
            "8",
            "--max-finished-jobs",
            "9",
        ])
        .unwrap();
        let config = args.runner_config("127.0.0.1:5".parse().unwrap());
        assert_eq!((config.max_queue, config.max_connections), (0, 7));
        let queue = QueueConfig { job_ttl: Duration::from_secs(8), max_finished_jobs: 9 };
        assert_eq!(config.queue, Some(queue));
        assert_eq!(config.advertise, "10.0.0.1:80");
        assert_eq!(config.capacity, 5);
        assert_eq!(config.max_concurrency, 2);
        assert_eq!(config.load_fail_backoff, Duration::from_millis(4));
        assert_eq!(args.drain_timeout(), Duration::from_millis(3));
        let args = Args::try_parse_from(["runner-example", "--no-queue"]).unwrap();
        assert_eq!(args.runner_config("127.0.0.1:5".parse().unwrap()).queue, None);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            &["--capacity", "0"][..],
            &["--max-concurrency", "0"],
            &["--max-queue", "-1"],
            &["--max-connections", "0"],
            &["--job-ttl-s", "0"],
            &["--max-finished-jobs", "0"],
            &["--no-queue", "1"],
            &["--backend", "gpu"],
            &["--backend", "cpu"],
            &["--backend", "cuda"],
            &["--memory-mb", "0"],
            &["--memory-mb", "-1"],
            &["--device", "-1"],
            &["--load-threads", "0"],
            &["--advertise", "a b"],
            &["--advertise", ""],
            &["--listen", "nowhere"],
        ] {
            let argv = std::iter::once("runner-example").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
