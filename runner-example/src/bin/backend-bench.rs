//! `backend-bench`: load (miss) times of the backends against the hardware's floor, hit
//! times, and hit times during loads, per model size, as Markdown tables; see
//! `backend-bench --help`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use runner_example::bench::{run, tables, BenchConfig};
use runner_example::cli::BackendKind;

/// Measures, for models of each size: the floor (reading the file from the page cache; with
/// cuda, a pinned host-to-device copy), each backend's first load, re-load and warm re-load
/// with their ratio to the floor, hit times, and (cpu) hit latency while another model loads.
///
/// Models are written (with make-models' generator) into --dir, or a temporary directory
/// that is removed afterwards (also on Ctrl-C).
#[derive(Debug, Parser)]
#[command(name = "backend-bench", version)]
struct Args {
    /// Model sizes, in MiB (e.g. 64,1024).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_name = "MIB,...")]
    sizes_mb: Vec<u64>,

    /// Backends to measure [default: sim,cpu, and cuda when built with the cuda feature].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "BACKEND,...")]
    backends: Vec<BackendKind>,

    /// Loads of each kind (first, re-load, warm re-load) per backend and size.
    #[arg(long, default_value_t = 5, value_name = "N")]
    loads: usize,

    /// Inferences per backend and size.
    #[arg(long, default_value_t = 50, value_name = "N")]
    infers: usize,

    /// Size of the model whose hits are timed during loads of the biggest size, in MiB (0:
    /// skip that measurement).
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    hit_model_mb: u64,

    /// Hits timed alone and during loads.
    #[arg(long, default_value_t = 200, value_name = "N")]
    hits: usize,

    /// Load-check threads (the runner's --load-threads) to time first loads with, each, side
    /// by side; the last one is used for everything else. [default: 1 and the number of CPUs]
    #[arg(long, value_delimiter = ',', value_name = "N,...",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    load_threads: Vec<usize>,

    /// GPU for the cuda backend.
    #[arg(long, default_value_t = 0, value_name = "N")]
    device: usize,

    /// Directory to write the models into (kept); default: a temporary one, removed.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Removes a directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut backends = args.backends;
    if backends.is_empty() {
        backends = vec![BackendKind::Sim, BackendKind::Cpu];
        if cfg!(feature = "cuda") {
            backends.push(BackendKind::Cuda);
        }
    }
    let mut load_threads = args.load_threads;
    if load_threads.is_empty() {
        load_threads = vec![1, runner_example::weights::default_load_threads()];
        load_threads.dedup();
    }
    let temp = match args.dir {
        Some(_) => None,
        None => Some(TempDir(std::env::temp_dir().join(format!("backend-bench-{}", std::process::id())))),
    };
    let dir = args.dir.or_else(|| temp.as_ref().map(|t| t.0.clone())).unwrap_or_default();
    let config = BenchConfig {
        sizes_mb: args.sizes_mb,
        backends,
        loads: args.loads,
        infers: args.infers,
        device: args.device,
        dir,
        hit_model_mb: args.hit_model_mb,
        hits: args.hits,
        load_threads,
    };
    eprintln!(
        "measuring {} x {:?} MiB: {} loads of each kind and {} inferences each, load-check threads {:?}, models in {}",
        config.backends.iter().map(|b| b.name()).collect::<Vec<_>>().join(","),
        config.sizes_mb,
        config.loads,
        config.infers,
        config.load_threads,
        config.dir.display()
    );
    let result = tokio::select! {
        result = run(&config, |line| eprintln!("  {line}")) => result,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_string()),
    };
    drop(temp); // the models go, whatever happened
    match result {
        Ok(report) => {
            print!("{}", tables(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("backend-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
