//! Model files: the small MLPs the real backends serve, as safetensors files plus a manifest.
//!
//! [`make_models`] (the `make-models` binary) writes `model-0 .. model-{N-1}`, each a
//! `MODEL.safetensors` file of random but deterministic f32 weights, and `manifest.json`
//! describing them. [`ModelDir`] reads the manifest; [`crate::weights`] reads a model back,
//! checked against it, into host memory; [`crate::mlp`] is the network and its reference
//! (CPU) forward pass.
//!
//! # The model
//!
//! Every model is the same small network of width `W` (chosen from the requested size):
//!
//! | tensor | shape | role |
//! | --- | --- | --- |
//! | `embed` | `[256, W]` | one row per prompt byte value |
//! | `layers.{i}.weight`, `layers.{i}.bias` | `[W, W]`, `[W]` | [`LAYERS`] hidden layers, `tanh` |
//! | `head.weight`, `head.bias` | `[OUTPUTS, W]`, `[OUTPUTS]` | the output logits |
//!
//! Matrices are row-major, `y = weight · x + bias` (PyTorch's `nn.Linear` layout). The prompt
//! becomes the vector `c` of [`prompt_features`] (256 byte-value weights); then
//! `x = embedᵀ · c`, `x = tanh(layer_i(x))` for each layer, `logits = head(x)`. The answer is
//! [`format_output`] of the logits: `argmax=K logits=[l0,l1,...]`.
//!
//! # The manifest
//!
//! `manifest.json` lists every model: name, file, the file's size, SHA-256 and BLAKE3, the
//! bytes its weights take in memory (what the cache's memory budget counts), and each tensor's
//! shape. A backend reads it once at start; see [`Manifest`]. Loads check files against the
//! BLAKE3 digest (several times faster than SHA-256, and as hard to forge); a manifest without
//! one (written before it existed) is checked against its SHA-256.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::BackendError;
pub use crate::mlp::{
    format_output, generate_weights, prompt_features, tensor_values, to_safetensors, Linear, MlpView,
    MlpWeights,
};
pub use crate::weights::{
    parse_weights, BufferPool, CheckPool, Checked, HostWeights, Loaded, VerifiedRecords,
};

/// The manifest's file name inside a models directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest's `format` value.
pub const FORMAT: &str = "runner-example-mlp";

/// The manifest's `version` value.
pub const VERSION: u32 = 1;

/// Rows of the embedding table: one per byte value.
pub const VOCAB: usize = 256;

/// Hidden layers of every model.
pub const LAYERS: usize = 4;

/// Output logits of every model.
pub const OUTPUTS: usize = 8;

/// Narrowest model width [`make_models`] writes.
pub const MIN_WIDTH: usize = 8;

/// One tensor of a model, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Its name in the safetensors file.
    pub name: String,
    /// Its shape; the dtype is always F32.
    pub shape: Vec<usize>,
}

/// One model of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The model's name: what requests ask for.
    pub name: String,
    /// Its safetensors file, relative to the models directory (a plain file name).
    pub file: String,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// Bytes the weights take once loaded (f32, host or device): what the memory budget and
    /// `resident_bytes` count.
    pub weight_bytes: u64,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    /// BLAKE3 of the whole file, lowercase hex: what loads check when present (absent in
    /// manifests written before it was added; those are checked against `sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// The model's width `W`.
    pub width: usize,
    /// Its tensors, in file order.
    pub tensors: Vec<TensorEntry>,
}

/// `manifest.json`: the models of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The seed the weights were made from.
    pub seed: u64,
    /// The models.
    pub models: Vec<ModelEntry>,
}

/// What a manifest says a file holds, looked up by model name. Read once, shared by a
/// backend's loads.
#[derive(Debug, Clone)]
pub struct ModelDir {
    dir: PathBuf,
    models: HashMap<String, ModelEntry>,
    records: Arc<VerifiedRecords>,
    checks: Arc<CheckPool>,
}

impl ModelDir {
    /// Reads and checks `DIR/manifest.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, String> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|e| {
            format!(
                "cannot read the model manifest {}: {e} (make models with `make-models --dir {}`)",
                path.display(),
                dir.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| format!("invalid model manifest {}: {e}", path.display()))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(format!(
                "model manifest {} is format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                path.display(),
                manifest.format,
                manifest.version
            ));
        }
        let mut models = HashMap::new();
        for entry in manifest.models {
            check_entry(&entry).map_err(|e| {
                format!("invalid model manifest {}: model {:?}: {e}", path.display(), entry.name)
            })?;
            if let Some(dup) = models.insert(entry.name.clone(), entry) {
                return Err(format!(
                    "invalid model manifest {}: model {:?} is listed twice",
                    path.display(),
                    dup.name
                ));
            }
        }
        Ok(Self { dir, models, records: Arc::default(), checks: Arc::default() })
    }

    /// The models directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest's entry for `model`.
    pub fn entry(&self, model: &str) -> Option<&ModelEntry> {
        self.models.get(model)
    }

    /// How many models the manifest lists.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether the manifest lists no model.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The manifest's entry for `model`, or [`BackendError::NotFound`].
    pub fn known(&self, model: &str) -> Result<&ModelEntry, BackendError> {
        self.entry(model).ok_or_else(|| {
            BackendError::NotFound(format!("no model {model} in {}", self.dir.join(MANIFEST_FILE).display()))
        })
    }

    /// The same directory with `threads` threads checking each full load (`--load-threads`;
    /// by default [`crate::weights::default_load_threads`]): see [`CheckPool`].
    pub fn with_load_threads(self, threads: usize) -> Self {
        Self { checks: Arc::new(CheckPool::new(threads)), ..self }
    }

    /// The threads that check full loads (shared by the clones of this `ModelDir`).
    pub fn checks(&self) -> &CheckPool {
        &self.checks
    }

    /// The files that passed every check, by model (shared by the clones of this `ModelDir`).
    pub fn records(&self) -> &VerifiedRecords {
        &self.records
    }

    /// Reads and checks `model`'s weights into a host buffer (`pool`'s spare one when it
    /// fits, else a new one); see [`crate::weights`].
    pub fn read_host(
        &self,
        model: &str,
        pool: Option<&BufferPool>,
    ) -> Result<(HostWeights, Checked), BackendError> {
        crate::weights::read_host(&self.dir, self.known(model)?, Some(&self.records), &self.checks, pool)
    }

    /// Reads and checks `model`'s weights into `dst` (its `weight_bytes` long), calling
    /// `on_chunk` with each range of `dst` filled; see [`crate::weights::read_into`].
    pub fn read_into(
        &self,
        model: &str,
        dst: &mut [u8],
        on_chunk: &mut crate::weights::OnChunk<'_>,
    ) -> Result<Loaded, BackendError> {
        crate::weights::read_into(
            &self.dir,
            self.known(model)?,
            Some(&self.records),
            &self.checks,
            dst,
            on_chunk,
        )
    }

    /// Reads and checks `model`'s weights, one `Vec` per tensor.
    pub fn read(&self, model: &str) -> Result<MlpWeights, BackendError> {
        Ok(self.read_host(model, None)?.0.to_mlp())
    }
}

/// The tensors a model of width `width` has, in file order.
pub fn expected_tensors(width: usize) -> Vec<TensorEntry> {
    let t = |name: String, shape: Vec<usize>| TensorEntry { name, shape };
    let mut tensors = vec![t("embed".into(), vec![VOCAB, width])];
    for i in 0..LAYERS {
        tensors.push(t(format!("layers.{i}.weight"), vec![width, width]));
        tensors.push(t(format!("layers.{i}.bias"), vec![width]));
    }
    tensors.push(t("head.weight".into(), vec![OUTPUTS, width]));
    tensors.push(t("head.bias".into(), vec![OUTPUTS]));
    tensors
}

/// Number of f32 weights of a model of width `width`.
pub fn weight_count(width: usize) -> u64 {
    let w = width as u64;
    let (vocab, layers, outputs) = (VOCAB as u64, LAYERS as u64, OUTPUTS as u64);
    vocab * w + layers * (w * w + w) + outputs * w + outputs
}

/// The widest model whose weights take at most `bytes` bytes (at least [`MIN_WIDTH`]).
pub fn width_for_bytes(bytes: u64) -> usize {
    let mut width = MIN_WIDTH;
    // Start near the root of LAYERS·W² + ... = bytes/4, then adjust.
    let floats = (bytes / 4) as f64;
    let guess = (floats / LAYERS as f64).sqrt() as usize;
    if guess > width {
        width = guess;
    }
    while width > MIN_WIDTH && weight_count(width) * 4 > bytes {
        width -= 1;
    }
    while weight_count(width + 1) * 4 <= bytes {
        width += 1;
    }
    width
}

fn check_entry(entry: &ModelEntry) -> Result<(), String> {
    let file = Path::new(&entry.file);
    let plain = file.file_name().is_some_and(|n| n == file.as_os_str()) && !entry.file.contains(['/', '\\']);
    if !plain {
        return Err(format!("file {:?} is not a plain file name inside the models directory", entry.file));
    }
    if entry.width == 0 {
        return Err("width is 0".to_string());
    }
    if entry.tensors != expected_tensors(entry.width) {
        return Err(format!("its tensors are not those of a {FORMAT} model of width {}", entry.width));
    }
    if entry.weight_bytes != weight_count(entry.width) * 4 {
        return Err(format!(
            "weight_bytes {} does not match width {} ({} bytes)",
            entry.weight_bytes,
            entry.width,
            weight_count(entry.width) * 4
        ));
    }
    let is_hex =
        |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hex(&entry.sha256) {
        return Err("sha256 is not 64 lowercase hex digits".to_string());
    }
    if entry.blake3.as_deref().is_some_and(|b| !is_hex(b)) {
        return Err("blake3 is not 64 lowercase hex digits".to_string());
    }
    Ok(())
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex BLAKE3 of `data`.
pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// The name of model `index`.
pub fn model_name(index: usize) -> String {
    format!("model-{index}")
}

/// Writes `count` models `model-0 .. model-{count-1}` of about `size_bytes` bytes of weights
/// each (at most that, and at least a width of [`MIN_WIDTH`]) into `dir` (created if needed),
/// deterministic from `seed`, and their `manifest.json`. Nothing is downloaded.
pub fn make_models(dir: &Path, count: usize, size_bytes: u64, seed: u64) -> io::Result<Manifest> {
    make_model_set(dir, &vec![size_bytes; count], seed)
}

/// Writes one model per entry of `sizes` (model `i` of about `sizes[i]` bytes of weights) and
/// their manifest, as [`make_models`] does.
///
/// Files are written one tensor at a time (never a whole model in memory), and read back once
/// for their digests: a 1 GiB model takes a few seconds.
pub fn make_model_set(dir: &Path, sizes: &[u64], seed: u64) -> io::Result<Manifest> {
    std::fs::create_dir_all(dir)?;
    let mut models = Vec::with_capacity(sizes.len());
    for (index, &size_bytes) in sizes.iter().enumerate() {
        let width = width_for_bytes(size_bytes);
        let name = model_name(index);
        let file = format!("{name}.safetensors");
        let path = dir.join(&file);
        let tensors: Vec<(String, LazyTensor)> = expected_tensors(width)
            .into_iter()
            .enumerate()
            .map(|(tensor, t)| (t.name, LazyTensor { seed, index, width, tensor, shape: t.shape }))
            .collect();
        // Writes through a temporary file and a rename: readers never see half a file.
        safetensors::serialize_to_file(tensors, Some(crate::mlp::file_metadata(&name)), &path)
            .map_err(io::Error::other)?;
        let (file_bytes, sha256, blake3) = digest_file(&path)?;
        models.push(ModelEntry {
            weight_bytes: weight_count(width) * 4,
            file_bytes,
            sha256,
            blake3: Some(blake3),
            name,
            file,
            width,
            tensors: expected_tensors(width),
        });
    }
    let manifest = Manifest { format: FORMAT.to_string(), version: VERSION, seed, models };
    let json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    write_atomically(&dir.join(MANIFEST_FILE), &json)?;
    Ok(manifest)
}

/// A tensor of a generated model, drawn when the writer asks for its bytes.
struct LazyTensor {
    seed: u64,
    index: usize,
    width: usize,
    tensor: usize,
    shape: Vec<usize>,
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(crate::mlp::le_bytes(&tensor_values(self.seed, self.index, self.width, self.tensor)))
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// The size, SHA-256 and BLAKE3 of the file at `path`, in one read.
fn digest_file(path: &Path) -> io::Result<(u64, String, String)> {
    let mut file = std::fs::File::open(path)?;
    let (mut sha, mut b3) = (Sha256::new(), blake3::Hasher::new());
    let mut buf = vec![0u8; crate::weights::CHUNK];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        let Some(data) = buf.get(..n) else { break };
        if n == 0 {
            break;
        }
        sha.update(data);
        b3.update(data);
        len += n as u64;
    }
    Ok((len, hex(&sha.finalize()), b3.finalize().to_hex().to_string()))
}

/// Writes `path` through a temporary file and a rename, so readers never see half a file.
fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_fit_the_size() {
        for mb in [1u64, 16, 64] {
            let bytes = mb << 20;
            let w = width_for_bytes(bytes);
            assert!(weight_count(w) * 4 <= bytes, "{mb}");
            assert!(weight_count(w + 1) * 4 > bytes, "{mb}");
            // "about M MB": within 1% for these sizes.
            assert!(weight_count(w) * 4 > bytes * 99 / 100, "{mb}: {w}");
        }
        assert_eq!(width_for_bytes(0), MIN_WIDTH);
        assert_eq!(width_for_bytes(1000), MIN_WIDTH);
    }

    #[test]
    fn written_files_are_the_in_memory_serialisation() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = make_model_set(dir.path(), &[40_000, 90_000], 7).unwrap();
        for (index, entry) in manifest.models.iter().enumerate() {
            let file = std::fs::read(dir.path().join(&entry.file)).unwrap();
            let in_memory = to_safetensors(&generate_weights(7, index, entry.width), &entry.name).unwrap();
            assert_eq!(file, in_memory, "{}", entry.name);
            assert_eq!(entry.sha256, sha256_hex(&file));
            assert_eq!(entry.blake3.as_deref(), Some(blake3_hex(&file).as_str()));
            assert_eq!(entry.file_bytes, file.len() as u64);
            check_entry(entry).unwrap();
        }
        assert!(manifest.models[0].width < manifest.models[1].width);
    }

    #[test]
    fn manifests_without_blake3_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = make_models(dir.path(), 1, 40_000, 1).unwrap();
        manifest.models[0].blake3 = None;
        let json = serde_json::to_string(&manifest).unwrap();
        assert!(!json.contains("blake3"), "{json}");
        std::fs::write(dir.path().join(MANIFEST_FILE), json).unwrap();
        let models = ModelDir::open(dir.path()).unwrap();
        assert_eq!(models.entry("model-0").unwrap().blake3, None);
        // ... and load, checked against the SHA-256.
        let (weights, checked) = models.read_host("model-0", None).unwrap();
        assert_eq!(checked, Checked::Full);
        assert_eq!(weights.to_mlp(), generate_weights(1, 0, manifest.models[0].width));
    }

    #[test]
    fn rejects_bad_manifest_entries() {
        let good = ModelEntry {
            name: "m".into(),
            file: "m.safetensors".into(),
            file_bytes: 1,
            weight_bytes: weight_count(8) * 4,
            sha256: "0".repeat(64),
            blake3: Some("1".repeat(64)),
            width: 8,
            tensors: expected_tensors(8),
        };
        check_entry(&good).unwrap();
        check_entry(&ModelEntry { blake3: None, ..good.clone() }).unwrap();
        for bad in [
            ModelEntry { file: "../m.safetensors".into(), ..good.clone() },
            ModelEntry { file: "/etc/passwd".into(), ..good.clone() },
            ModelEntry { width: 9, ..good.clone() },
            ModelEntry { weight_bytes: 4, ..good.clone() },
            ModelEntry { sha256: "X".repeat(64), ..good.clone() },
            ModelEntry { blake3: Some("ab".into()), ..good.clone() },
        ] {
            assert!(check_entry(&bad).is_err(), "{bad:?}");
        }
    }
}
