//! `make-models`: writes small random MLP models as safetensors files, and their manifest,
//! for the `cpu` and `cuda` backends. Nothing is downloaded; see `make-models --help`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use runner_example::models::{make_models, MANIFEST_FILE};

/// Writes N small models `model-0 .. model-{N-1}` (random but deterministic f32 weights of a
/// small MLP, about --size-mb MiB each) as DIR/model-I.safetensors, and DIR/manifest.json
/// listing their files, sizes, SHA-256 sums and tensor shapes.
///
/// The same --count, --size-mb and --seed always give the same files.
#[derive(Debug, Parser)]
#[command(name = "make-models", version)]
struct Args {
    /// Directory to write into (created if needed; existing model files are replaced).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// How many models to write.
    #[arg(long, default_value_t = 4, value_name = "N")]
    count: usize,

    /// Size of each model's weights, in MiB (fractions allowed): the widest model that fits.
    #[arg(long, default_value_t = 1.0, value_name = "MIB", value_parser = parse_size)]
    size_mb: f64,

    /// Seed of the weights.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
}

fn parse_size(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 65536.0 => Ok(v),
        Ok(_) => Err("must be more than 0 and at most 65536".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bytes = (args.size_mb * f64::from(1u32 << 20)) as u64;
    match make_models(&args.dir, args.count, bytes, args.seed) {
        Ok(manifest) => {
            let first = manifest.models.first();
            println!(
                "wrote {} model(s) of width {}, {} bytes of weights each, and {} to {}",
                manifest.models.len(),
                first.map_or(0, |m| m.width),
                first.map_or(0, |m| m.weight_bytes),
                MANIFEST_FILE,
                args.dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-models: cannot write models to {}: {e}", args.dir.display());
            ExitCode::FAILURE
        }
    }
}
