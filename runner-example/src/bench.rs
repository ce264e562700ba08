//! `backend-bench`: what a miss costs against what the hardware makes it cost, and what a hit
//! costs with and without a load beside it.
//!
//! For each model size, in one run:
//!
//! * **floor**: reading the model file from the page cache into a buffer that is already
//!   allocated and faulted in (one `read` of the whole file, after a warm-up read); with the
//!   cuda feature, also a bare host-to-device copy of the same bytes from pinned memory;
//! * per backend, through [`Backend::load`]: the **first load** (a backend just opened, so the
//!   file is checked in full: header, digest, values), the **re-load** (the same backend again,
//!   after dropping the model, as an eviction would: the file is unchanged since it passed, so
//!   its digest is not recomputed) and, with a warm tier big enough for the model, the **warm
//!   re-load** (no disk read: a copy from host memory); each with its ratio to the floor
//!   (floor time / load time: 1.0 is the hardware's speed);
//! * per backend, hits: [`LoadedModel::infer`] on a loaded model after one warm-up;
//! * per real backend, the first load again with each count of load-check threads of
//!   [`BenchConfig::load_threads`] (the runner's `--load-threads`), side by side; every
//!   other measurement uses the last count.
//!
//! Then, on the cpu backend, **hits during a load**: a runner holds a small model and serves
//! hits on it, first alone, then while the same backend loads the biggest model over and
//! over (each load checked in full); p50 and p99 of both, and their ratio.
//!
//! Models are written with [`make_model_set`]; files are given [`SETTLE`] to settle before
//! loads are timed (a file changed less than that ago is always checked in full).

mod tables;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use self::tables::tables;
use crate::backend::{Backend, LoadedModel, SimBackend};
use crate::cli::BackendKind;
use crate::cpu::CpuBackend;
use crate::models::{make_model_set, model_name, ModelDir};
use crate::runner::{Runner, RunnerConfig};
use crate::weights::{HostBuf, SETTLE};

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    /// Model sizes, in MiB.
    pub sizes_mb: Vec<u64>,
    /// Backends to measure.
    pub backends: Vec<BackendKind>,
    /// Loads per backend and size (each of first, re-load and warm re-load).
    pub loads: usize,
    /// Inferences per backend and size.
    pub infers: usize,
    /// GPU for `cuda`.
    pub device: usize,
    /// Where to write the models (one subdirectory per size).
    pub dir: PathBuf,
    /// Size of the model hits are measured on during loads, in MiB (0: skip that part).
    pub hit_model_mb: u64,
    /// Hits measured, alone and during loads.
    pub hits: usize,
    /// Load-check threads (`--load-threads`) to time first loads with, each; the last one is
    /// also what every other measurement uses (empty: the runner's default).
    pub load_threads: Vec<usize>,
}

impl BenchConfig {
    /// The load-check threads of every measurement but the first loads by thread count.
    pub fn main_load_threads(&self) -> usize {
        self.load_threads.last().copied().unwrap_or_else(crate::weights::default_load_threads)
    }
}

/// Median, 90th and 99th percentile of some durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spread {
    /// The median.
    pub median: Duration,
    /// The 90th percentile (nearest rank).
    pub p90: Duration,
    /// The 99th percentile (nearest rank).
    pub p99: Duration,
}

impl Spread {
    /// The spread of `samples` (zero when there are none).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: f64| {
            let rank = ((samples.len() as f64) * q).ceil() as usize;
            samples.get(rank.saturating_sub(1)).copied().unwrap_or_default()
        };
        Self { median: at(0.5), p90: at(0.9), p99: at(0.99) }
    }
}

/// The floors for one size.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    /// The model size asked for, in MiB.
    pub size_mb: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// Reading the file from the page cache into a ready buffer.
    pub read: Spread,
    /// The same into a buffer allocated for it (what a load must do: the difference is the
    /// kernel zeroing and mapping fresh memory).
    pub read_fresh: Spread,
    /// A host-to-device copy of the same bytes from pinned memory (`None`: not measured).
    pub pinned_copy: Option<Spread>,
}

/// One backend at one size.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRow {
    /// The backend.
    pub backend: BackendKind,
    /// The model size asked for, in MiB.
    pub size_mb: u64,
    /// The model's weights, in bytes.
    pub weight_bytes: u64,
    /// Loads by a backend just opened (checked in full), with
    /// [`BenchConfig::main_load_threads`].
    pub first: Spread,
    /// The same, per load-check thread count of [`BenchConfig::load_threads`] (real backends).
    pub first_by_threads: Vec<(usize, Spread)>,
    /// Loads of the unchanged file by the same backend (header checked, digest recorded).
    pub reload: Spread,
    /// Loads from the warm tier (`None`: the backend has none).
    pub warm: Option<Spread>,
    /// Inference (hit) times.
    pub hit: Spread,
}

/// Hits on a resident model, alone and during loads of another.
#[derive(Debug, Clone, PartialEq)]
pub struct HitsDuringLoads {
    /// The hit model's size, in MiB.
    pub hit_mb: u64,
    /// The loaded model's size, in MiB.
    pub load_mb: u64,
    /// Hits alone.
    pub alone: Spread,
    /// Hits while loads ran.
    pub during: Spread,
    /// Loads that completed while the hits ran.
    pub loads: usize,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// Floors, per size.
    pub floors: Vec<Floor>,
    /// Loads and hits, per size and backend.
    pub rows: Vec<LoadRow>,
    /// Hits during loads (cpu), when measured.
    pub hits: Option<HitsDuringLoads>,
    /// The load-check threads of every measurement but [`LoadRow::first_by_threads`].
    pub load_threads: usize,
}

/// Opens `kind` on the models in `dir`, with a warm tier of `host_cache` bytes and
/// `load_threads` load-check threads (`cpu`, `cuda`). `sim` has no delays (it measures the
/// trait's overhead only).
pub fn open_backend(
    kind: BackendKind,
    dir: &Path,
    device: usize,
    host_cache: Option<u64>,
    load_threads: usize,
) -> Result<Arc<dyn Backend>, String> {
    let _ = device;
    match kind {
        BackendKind::Sim => {
            let bytes = ModelDir::open(dir)?.entry(&model_name(0)).map(|e| e.weight_bytes);
            Ok(Arc::new(SimBackend::new(Duration::ZERO, Duration::ZERO).with_model_bytes(bytes)))
        }
        BackendKind::Cpu => {
            Ok(Arc::new(CpuBackend::open(dir)?.with_host_cache(host_cache).with_load_threads(load_threads)))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Arc::new(
            crate::cuda::CudaBackend::open(dir, device)?
                .with_host_cache(host_cache)
                .with_load_threads(load_threads),
        )),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err("built without the cuda feature".to_string()),
    }
}

async fn open(
    kind: BackendKind,
    dir: &Path,
    device: usize,
    host_cache: Option<u64>,
    load_threads: usize,
) -> Result<Arc<dyn Backend>, String> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || open_backend(kind, &dir, device, host_cache, load_threads))
        .await
        .map_err(|e| e.to_string())?
}

/// Times `loads` loads of `model-0`, each after dropping the previous copy, with
/// `load_threads` load-check threads; `fresh` opens the backend anew before each (so nothing
/// is remembered between loads).
async fn time_loads(
    kind: BackendKind,
    dir: &Path,
    config: &BenchConfig,
    host_cache: Option<u64>,
    fresh: bool,
    load_threads: usize,
) -> Result<(Spread, Arc<dyn LoadedModel>), String> {
    let model = model_name(0);
    let mut backend = open(kind, dir, config.device, host_cache, load_threads).await?;
    let mut times = Vec::new();
    let mut loaded: Option<Arc<dyn LoadedModel>> = None;
    // Not timed: fills the warm tier, or the verified records.
    if !fresh {
        loaded = Some(Arc::clone(&backend).load(model.clone()).await.map_err(|e| e.to_string())?);
    }
    for _ in 0..config.loads.max(1) {
        drop(loaded.take()); // evict the previous copy before loading again
        if fresh {
            backend = open(kind, dir, config.device, host_cache, load_threads).await?;
        }
        let start = Instant::now();
        let m = Arc::clone(&backend).load(model.clone()).await.map_err(|e| e.to_string())?;
        times.push(start.elapsed());
        loaded = Some(m);
    }
    let loaded = loaded.ok_or("nothing loaded")?;
    Ok((Spread::of(times), loaded))
}

/// Times `infers` inferences on `loaded`, after one warm-up.
async fn time_hits(loaded: &Arc<dyn LoadedModel>, infers: usize) -> Result<Spread, String> {
    Arc::clone(loaded).infer("warm-up".to_string()).await.map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(infers);
    for i in 0..infers.max(1) {
        let start = Instant::now();
        Arc::clone(loaded).infer(format!("prompt number {i}")).await.map_err(|e| e.to_string())?;
        times.push(start.elapsed());
    }
    Ok(Spread::of(times))
}

/// Measures one backend at one size.
pub async fn measure(
    kind: BackendKind,
    size_mb: u64,
    dir: &Path,
    config: &BenchConfig,
) -> Result<LoadRow, String> {
    let threads = config.main_load_threads();
    let mut first_by_threads = Vec::new();
    if kind != BackendKind::Sim {
        for &n in config.load_threads.iter().filter(|&&n| n != threads) {
            let (first, loaded) = time_loads(kind, dir, config, None, true, n).await?;
            drop(loaded);
            first_by_threads.push((n, first));
        }
    }
    let (first, loaded) = time_loads(kind, dir, config, None, true, threads).await?;
    if kind != BackendKind::Sim {
        first_by_threads.push((threads, first));
    }
    let weight_bytes = loaded.resident_bytes().unwrap_or(0);
    let hit = time_hits(&loaded, config.infers).await?;
    drop(loaded);
    let (reload, loaded) = time_loads(kind, dir, config, None, false, threads).await?;
    drop(loaded);
    let warm = match kind {
        BackendKind::Sim => None,
        _ => {
            let room = Some(weight_bytes.max(1));
            let (warm, loaded) = time_loads(kind, dir, config, room, false, threads).await?;
            drop(loaded);
            Some(warm)
        }
    };
    Ok(LoadRow { backend: kind, size_mb, weight_bytes, first, first_by_threads, reload, warm, hit })
}

/// Reads the whole of `path` into `buf` (its length).
fn read_file(path: &Path, buf: &mut [u8]) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    file.read_exact(buf).map_err(|e| e.to_string())
}

/// The page-cache floors of `path`, `reps` times each. Blocking.
pub fn measure_floor(size_mb: u64, path: &Path, reps: usize) -> Result<Floor, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let bytes = usize::try_from(len).map_err(|e| e.to_string())?;
    let alloc = |n: usize| HostBuf::zeroed(n.next_multiple_of(4)).map_err(|e| e.to_string());
    let mut buf = alloc(bytes)?;
    let ready = buf.bytes_mut().get_mut(..bytes).ok_or("short buffer")?;
    ready.fill(1); // fault it in
    read_file(path, ready)?; // and the page cache
    let mut read = Vec::new();
    let mut fresh = Vec::new();
    for _ in 0..reps.max(3) {
        let start = Instant::now();
        read_file(path, ready)?;
        read.push(start.elapsed());
        let start = Instant::now();
        let mut new = alloc(bytes)?;
        read_file(path, new.bytes_mut().get_mut(..bytes).ok_or("short buffer")?)?;
        fresh.push(start.elapsed());
        drop(new);
    }
    Ok(Floor {
        size_mb,
        file_bytes: len,
        read: Spread::of(read),
        read_fresh: Spread::of(fresh),
        pinned_copy: None,
    })
}

/// A bare host-to-device copy of `bytes` bytes from pinned memory, `reps` times. Blocking.
#[cfg(feature = "cuda")]
pub fn measure_pinned_copy(device: usize, bytes: u64, reps: usize) -> Result<Spread, String> {
    let ctx = crate::cuda::open_device(device)?;
    let floats = usize::try_from(bytes.div_ceil(4)).map_err(|e| e.to_string())?;
    let mut pinned = crate::cuda::alloc_pinned(&ctx, floats)?;
    pinned.as_mut_slice().map_err(|e| e.to_string())?.fill(1.0);
    let stream = ctx.new_stream().map_err(|e| e.to_string())?;
    let mut dev = stream.alloc_zeros::<f32>(floats).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for i in 0..reps.max(3) + 1 {
        let start = Instant::now();
        stream.memcpy_htod(&pinned, &mut dev).map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
        if i > 0 {
            times.push(start.elapsed()); // the first is a warm-up
        }
    }
    Ok(Spread::of(times))
}

/// Hits on `model-0` of `dir` through a cpu runner, alone, then while the same backend loads
/// `model-1` again and again (each load checked in full, by `load_threads` threads).
pub async fn measure_hits_during_loads(
    dir: &Path,
    hits: usize,
    hit_mb: u64,
    load_mb: u64,
    load_threads: usize,
) -> Result<HitsDuringLoads, String> {
    let backend = {
        let dir = dir.to_path_buf();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                CpuBackend::open(&dir).map(|b| b.with_load_threads(load_threads))
            })
            .await
            .map_err(|e| e.to_string())??,
        )
    };
    let config = RunnerConfig { capacity: 2, max_concurrency: 4, ..RunnerConfig::new("127.0.0.1:1") };
    let runner = Runner::new(config, backend.clone());
    let hit = |i: usize| {
        let runner = runner.clone();
        async move {
            let start = Instant::now();
            runner.infer(&model_name(0), format!("prompt {i}")).await.map_err(|e| format!("{e:?}"))?;
            Ok::<_, String>(start.elapsed())
        }
    };
    hit(0).await?; // the miss, and a warm-up
    hit(0).await?;
    let mut alone = Vec::with_capacity(hits);
    for i in 0..hits.max(1) {
        alone.push(hit(i).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = {
        let (stop, loads, backend) = (Arc::clone(&stop), Arc::clone(&loads), Arc::clone(&backend));
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                backend.models().records().clear(); // every load checked in full
                let loaded = Arc::clone(&backend).load(model_name(1)).await.map_err(|e| e.to_string())?;
                drop(loaded);
                loads.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, String>(())
        })
    };
    // Let the first load get going before the first hit.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut during = Vec::with_capacity(hits);
    let mut i = 0;
    while i < hits.max(1) || loads.load(Ordering::SeqCst) == 0 {
        during.push(hit(i).await?);
        i += 1;
    }
    stop.store(true, Ordering::SeqCst);
    loader.await.map_err(|e| e.to_string())??;
    Ok(HitsDuringLoads {
        hit_mb,
        load_mb,
        alone: Spread::of(alone),
        during: Spread::of(during),
        loads: loads.load(Ordering::SeqCst),
    })
}

/// Makes the models and measures everything `config` asks for; calls `progress` with a line
/// for people as each part is measured.
pub async fn run(config: &BenchConfig, mut progress: impl FnMut(&str)) -> Result<Report, String> {
    let mut report = Report { load_threads: config.main_load_threads(), ..Report::default() };
    let mut dirs = Vec::new();
    for &size_mb in &config.sizes_mb {
        let dir = config.dir.join(format!("{size_mb}mb"));
        let started = Instant::now();
        make_in(&dir, vec![size_mb << 20]).await?;
        progress(&format!("made a {size_mb} MiB model in {:.1} s", started.elapsed().as_secs_f64()));
        dirs.push((size_mb, dir));
    }
    let hit_set = match (config.hit_model_mb, config.sizes_mb.iter().max()) {
        (0, _) | (_, None) => None,
        (hit_mb, Some(&load_mb)) => {
            let dir = config.dir.join("hits");
            make_in(&dir, vec![hit_mb << 20, load_mb << 20]).await?;
            Some((dir, hit_mb, load_mb))
        }
    };
    // Files changed less than SETTLE ago are always checked in full: let them settle.
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    for (size_mb, dir) in &dirs {
        let path = dir.join(format!("{}.safetensors", model_name(0)));
        let reps = config.loads.max(3);
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut floor = tokio::task::spawn_blocking({
            let (path, size_mb) = (path.clone(), *size_mb);
            move || measure_floor(size_mb, &path, reps)
        })
        .await
        .map_err(|e| e.to_string())??;
        #[cfg(feature = "cuda")]
        if config.backends.contains(&BackendKind::Cuda) {
            let (device, bytes) = (config.device, floor.file_bytes);
            floor.pinned_copy = Some(
                tokio::task::spawn_blocking(move || measure_pinned_copy(device, bytes, reps))
                    .await
                    .map_err(|e| e.to_string())??,
            );
        }
        progress(&format!("{size_mb} MiB floor: page-cache read {:?}", floor.read.median));
        report.floors.push(floor);
        for &kind in &config.backends {
            let row = measure(kind, *size_mb, dir, config).await?;
            progress(&format!(
                "{kind} {size_mb} MiB: first load {:?}, re-load {:?}, warm {:?}, hit {:?}",
                row.first.median,
                row.reload.median,
                row.warm.map(|w| w.median),
                row.hit.median
            ));
            report.rows.push(row);
        }
    }
    if let Some((dir, hit_mb, load_mb)) = hit_set {
        if config.backends.contains(&BackendKind::Cpu) {
            let threads = config.main_load_threads();
            let hits = measure_hits_during_loads(&dir, config.hits, hit_mb, load_mb, threads).await?;
            progress(&format!(
                "hits on {hit_mb} MiB: p50 {:?} alone, {:?} during {} loads of {load_mb} MiB",
                hits.alone.median, hits.during.median, hits.loads
            ));
            report.hits = Some(hits);
        }
    }
    Ok(report)
}

async fn make_in(dir: &Path, sizes: Vec<u64>) -> Result<(), String> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        make_model_set(&dir, &sizes, 0)
            .map(drop)
            .map_err(|e| format!("making models in {}: {e}", dir.display()))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = Spread::of((1..=10).rev().map(ms).collect());
        assert_eq!(s, Spread { median: ms(5), p90: ms(9), p99: ms(10) });
        assert_eq!(Spread::of(vec![ms(3)]), Spread { median: ms(3), p90: ms(3), p99: ms(3) });
        assert_eq!(Spread::of(Vec::new()).median, Duration::ZERO);
    }

    #[tokio::test]
    async fn measures_floors_loads_and_hits_during_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = BenchConfig {
            sizes_mb: vec![1],
            backends: vec![BackendKind::Sim, BackendKind::Cpu],
            loads: 2,
            infers: 3,
            device: 0,
            dir: dir.path().to_path_buf(),
            hit_model_mb: 1,
            hits: 5,
            load_threads: vec![1, 2],
        };
        let mut lines = 0;
        let report = run(&config, |_| lines += 1).await.unwrap();
        assert!(lines >= 4, "{lines}");
        assert_eq!(report.floors.len(), 1);
        assert!(report.floors[0].read.median > Duration::ZERO);
        assert_eq!(report.floors[0].pinned_copy, None);
        assert_eq!(report.rows.len(), 2);
        assert!(report.rows.iter().all(|r| r.weight_bytes > 1000 && r.weight_bytes <= 1 << 20));
        let cpu = &report.rows[1];
        assert!(cpu.warm.is_some() && cpu.first.median > Duration::ZERO);
        let hits = report.hits.as_ref().unwrap();
        assert!(hits.loads >= 1 && hits.during.median > Duration::ZERO);
        let tables = tables(&report);
        assert!(tables.contains("| cpu | 1 |"), "{tables}");
        assert!(tables.contains("unmeasured"), "{tables}");
        assert!(tables.contains("| during / alone |"), "{tables}");
        // First loads at each load-check thread count, the main one last.
        let threads: Vec<usize> = cpu.first_by_threads.iter().map(|(n, _)| *n).collect();
        assert_eq!(threads, [1, 2]);
        assert_eq!(cpu.first_by_threads[1].1, cpu.first);
        assert!(report.rows[0].first_by_threads.is_empty(), "sim has no checks");
        assert!(tables.contains("| cpu | 1 | 1 |") && tables.contains("| cpu | 1 | 2 |"), "{tables}");
    }
}
