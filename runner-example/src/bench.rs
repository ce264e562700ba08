//! `backend-bench`: how long each backend takes to load a model (a miss) and to run one
//! inference on a loaded model (a hit), for a few model sizes.
//!
//! Measured through the [`Backend`] and [`LoadedModel`] traits, without the cache or HTTP:
//! each load is a fresh [`Backend::load`] of the same model (the previous copy dropped first,
//! as an eviction would), each hit one [`LoadedModel::infer`] on a loaded model after one
//! warm-up inference. Models are made with [`make_models`] into a directory first, so loads
//! read files the page cache most likely still holds: load times are parse, checksum and
//! copy times, not disk times.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, LoadedModel, SimBackend};
use crate::cli::BackendKind;
use crate::cpu::CpuBackend;
use crate::models::{make_models, model_name, ModelDir};

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    /// Model sizes, in MiB.
    pub sizes_mb: Vec<u64>,
    /// Backends to measure.
    pub backends: Vec<BackendKind>,
    /// Loads per backend and size.
    pub loads: usize,
    /// Inferences per backend and size.
    pub infers: usize,
    /// GPU for `cuda`.
    pub device: usize,
    /// Where to write the models (one subdirectory per size).
    pub dir: PathBuf,
}

/// Median and 90th percentile of some durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// The median.
    pub median: Duration,
    /// The 90th percentile (nearest rank).
    pub p90: Duration,
}

impl Spread {
    /// The spread of `samples` (zero when there are none).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            let rank = ((samples.len() as f64) * q).ceil() as usize;
            samples.get(rank.saturating_sub(1)).copied().unwrap_or_default()
        };
        Self { median: at(0.5), p90: at(0.9) }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchRow {
    /// The backend.
    pub backend: BackendKind,
    /// The model size asked for, in MiB.
    pub size_mb: u64,
    /// The model's weights, in bytes.
    pub weight_bytes: u64,
    /// Load (miss) times.
    pub load: Spread,
    /// Inference (hit) times.
    pub hit: Spread,
}

/// Opens `kind` on the models in `dir`. `sim` has no delays (it measures the trait's
/// overhead only).
pub fn open_backend(kind: BackendKind, dir: &Path, device: usize) -> Result<Arc<dyn Backend>, String> {
    let _ = device;
    match kind {
        BackendKind::Sim => {
            let bytes = ModelDir::open(dir)?.entry(&model_name(0)).map(|e| e.weight_bytes);
            Ok(Arc::new(SimBackend::new(Duration::ZERO, Duration::ZERO).with_model_bytes(bytes)))
        }
        BackendKind::Cpu => Ok(Arc::new(CpuBackend::open(dir)?)),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Arc::new(crate::cuda::CudaBackend::open(dir, device)?)),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err("built without the cuda feature".to_string()),
    }
}

/// Measures one backend on the model `model-0` of `dir`.
pub async fn measure(
    backend: Arc<dyn Backend>,
    loads: usize,
    infers: usize,
) -> Result<(u64, Spread, Spread), String> {
    let model = model_name(0);
    let mut load_times = Vec::with_capacity(loads);
    let mut loaded: Option<Arc<dyn LoadedModel>> = None;
    for _ in 0..loads.max(1) {
        drop(loaded.take()); // evict the previous copy before loading again
        let start = Instant::now();
        let m = Arc::clone(&backend).load(model.clone()).await.map_err(|e| e.to_string())?;
        load_times.push(start.elapsed());
        loaded = Some(m);
    }
    let loaded = loaded.ok_or("nothing loaded")?;
    let bytes = loaded.resident_bytes().unwrap_or(0);
    // One warm-up inference (first-use costs: page faults, library initialisation).
    Arc::clone(&loaded).infer("warm-up".to_string()).await.map_err(|e| e.to_string())?;
    let mut hit_times = Vec::with_capacity(infers);
    for i in 0..infers.max(1) {
        let start = Instant::now();
        Arc::clone(&loaded).infer(format!("prompt number {i}")).await.map_err(|e| e.to_string())?;
        hit_times.push(start.elapsed());
    }
    Ok((bytes, Spread::of(load_times), Spread::of(hit_times)))
}

/// Makes the models and measures every backend and size of `config`, in that order; calls
/// `progress` with each row as it is measured.
pub async fn run(config: &BenchConfig, mut progress: impl FnMut(&BenchRow)) -> Result<Vec<BenchRow>, String> {
    let mut rows = Vec::new();
    for &size_mb in &config.sizes_mb {
        let dir = config.dir.join(format!("{size_mb}mb"));
        make_models(&dir, 1, size_mb << 20, 0)
            .map_err(|e| format!("making models in {}: {e}", dir.display()))?;
        for &kind in &config.backends {
            let backend = {
                let dir = dir.clone();
                let device = config.device;
                tokio::task::spawn_blocking(move || open_backend(kind, &dir, device))
                    .await
                    .map_err(|e| e.to_string())??
            };
            let (weight_bytes, load, hit) = measure(backend, config.loads, config.infers).await?;
            let row = BenchRow { backend: kind, size_mb, weight_bytes, load, hit };
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// The rows as a Markdown table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| backend | model MiB | weights bytes | load ms (median) | load ms (p90) | load GiB/s | hit ms (median) | hit ms (p90) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let secs = r.load.median.as_secs_f64();
        // sim reads nothing: no rate.
        let rate = if r.backend != BackendKind::Sim && secs > 0.0 && r.weight_bytes > 0 {
            format!("{:.2}", r.weight_bytes as f64 / secs / f64::from(1u32 << 30))
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.backend,
            r.size_mb,
            r.weight_bytes,
            ms(r.load.median),
            ms(r.load.p90),
            rate,
            ms(r.hit.median),
            ms(r.hit.p90)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = Spread::of((1..=10).rev().map(ms).collect());
        assert_eq!(s, Spread { median: ms(5), p90: ms(9) });
        assert_eq!(Spread::of(vec![ms(3)]), Spread { median: ms(3), p90: ms(3) });
        assert_eq!(Spread::of(Vec::new()).median, Duration::ZERO);
    }

    #[tokio::test]
    async fn measures_sim_and_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let config = BenchConfig {
            sizes_mb: vec![1],
            backends: vec![BackendKind::Sim, BackendKind::Cpu],
            loads: 2,
            infers: 3,
            device: 0,
            dir: dir.path().to_path_buf(),
        };
        let mut seen = 0;
        let rows = run(&config, |_| seen += 1).await.unwrap();
        assert_eq!(seen, 2);
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.weight_bytes > 1000 && r.weight_bytes <= 1 << 20));
        let table = table(&rows);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.contains("| cpu | 1 |"), "{table}");
    }
}
