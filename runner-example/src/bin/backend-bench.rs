//! `backend-bench`: load (miss) and inference (hit) times of the backends, per model size,
//! as a Markdown table; see `backend-bench --help`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use runner_example::bench::{run, table, BenchConfig, BenchRow};
use runner_example::cli::BackendKind;

/// Measures how long each backend takes to load a model and to run one inference on it, for
/// models of each size, and prints a Markdown table.
///
/// Models are written (with make-models' generator) into --dir, or a temporary directory
/// that is removed afterwards.
#[derive(Debug, Parser)]
#[command(name = "backend-bench", version)]
struct Args {
    /// Model sizes, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_name = "MIB,...")]
    sizes_mb: Vec<u64>,

    /// Backends to measure [default: sim,cpu, and cuda when built with the cuda feature].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "BACKEND,...")]
    backends: Vec<BackendKind>,

    /// Loads per backend and size.
    #[arg(long, default_value_t = 5, value_name = "N")]
    loads: usize,

    /// Inferences per backend and size.
    #[arg(long, default_value_t = 50, value_name = "N")]
    infers: usize,

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
    };
    eprintln!(
        "measuring {} x {:?} MiB: {} loads and {} inferences each, models in {}",
        config.backends.iter().map(|b| b.name()).collect::<Vec<_>>().join(","),
        config.sizes_mb,
        config.loads,
        config.infers,
        config.dir.display()
    );
    let progress = |row: &BenchRow| {
        eprintln!(
            "  {} {} MiB: load {:?}, hit {:?}",
            row.backend, row.size_mb, row.load.median, row.hit.median
        );
    };
    match run(&config, progress).await {
        Ok(rows) => {
            print!("{}", table(&rows));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("backend-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
