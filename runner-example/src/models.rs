//! Model files: the small MLPs the real backends serve, as safetensors files plus a manifest.
//!
//! [`make_models`] (the `make-models` binary) writes `model-0 .. model-{N-1}`, each a
//! `MODEL.safetensors` file of random but deterministic f32 weights, and `manifest.json`
//! describing them. [`read_weights`] reads one back, checking it against the manifest, into
//! [`MlpWeights`], whose [`forward`](MlpWeights::forward) is the reference (CPU) inference.
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
//! `manifest.json` lists every model: name, file, the file's size and SHA-256, the bytes its
//! weights take in memory (what the cache's memory budget counts), and each tensor's shape.
//! A backend reads it once at start; see [`Manifest`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::BackendError;

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
        Ok(Self { dir, models })
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

    /// Reads and checks `model`'s weights; see [`read_weights`].
    pub fn read(&self, model: &str) -> Result<MlpWeights, BackendError> {
        let entry = self.entry(model).ok_or_else(|| {
            BackendError::NotFound(format!("no model {model} in {}", self.dir.join(MANIFEST_FILE).display()))
        })?;
        read_weights(&self.dir, entry)
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
    let hex = entry.sha256.len() == 64
        && entry.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err("sha256 is not 64 lowercase hex digits".to_string());
    }
    Ok(())
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut hex = String::with_capacity(64);
    for b in digest.iter() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// A fully connected layer: `y = weight · x + bias`, `weight` row-major `[outputs, inputs]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Row-major `[outputs, inputs]`.
    pub weight: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
}

impl Linear {
    /// `weight · x + bias` into `out`.
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let inputs = x.len();
        for ((o, row), b) in out.iter_mut().zip(self.weight.chunks_exact(inputs)).zip(&self.bias) {
            *o = dot(row, x) + b;
        }
    }
}

/// A model's weights in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpWeights {
    /// The width `W`.
    pub width: usize,
    /// Row-major `[256, W]`.
    pub embed: Vec<f32>,
    /// The [`LAYERS`] hidden layers, `[W, W]` each.
    pub layers: Vec<Linear>,
    /// The output layer, `[OUTPUTS, W]`.
    pub head: Linear,
}

impl MlpWeights {
    /// Bytes the weights take.
    pub fn bytes(&self) -> u64 {
        let floats = self.embed.len()
            + self
                .layers
                .iter()
                .chain(std::iter::once(&self.head))
                .map(|l| l.weight.len() + l.bias.len())
                .sum::<usize>();
        floats as u64 * 4
    }

    /// The logits for `prompt`: the reference forward pass, in f32 on the CPU.
    pub fn forward(&self, prompt: &str) -> Vec<f32> {
        let w = self.width;
        let c = prompt_features(prompt);
        let mut x = vec![0.0f32; w];
        for (row, &weight) in self.embed.chunks_exact(w).zip(&c) {
            if weight != 0.0 {
                for (xi, ei) in x.iter_mut().zip(row) {
                    *xi += weight * ei;
                }
            }
        }
        let mut y = vec![0.0f32; w];
        for layer in &self.layers {
            layer.apply(&x, &mut y);
            for v in &mut y {
                *v = v.tanh();
            }
            std::mem::swap(&mut x, &mut y);
        }
        let mut logits = vec![0.0f32; OUTPUTS];
        self.head.apply(&x, &mut logits);
        logits
    }
}

/// Dot product with eight independent partial sums, which the compiler vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (ca, cb) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// The prompt as a vector `c` of 256 weights, one per byte value: byte `b` at position `t`
/// adds `1/(t+1)` to `c[b]` (so order matters), then `c` is scaled to unit length (all zero
/// for an empty prompt).
pub fn prompt_features(prompt: &str) -> Vec<f32> {
    let mut c = vec![0.0f32; VOCAB];
    for (t, &b) in prompt.as_bytes().iter().enumerate() {
        c[usize::from(b)] += 1.0 / (t as f32 + 1.0);
    }
    let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        for v in &mut c {
            *v /= norm;
        }
    }
    c
}

/// The answer for `logits`: `argmax=K logits=[l0,l1,...]`, four decimals each.
pub fn format_output(logits: &[f32]) -> String {
    let mut argmax = 0;
    for (i, v) in logits.iter().enumerate() {
        if logits.get(argmax).is_some_and(|best| v > best) {
            argmax = i;
        }
    }
    let mut out = format!("argmax={argmax} logits=[");
    for (i, v) in logits.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v:.4}");
    }
    out.push(']');
    out
}

/// Reads `entry`'s file from `dir` and checks it against the manifest: a safetensors file
/// with exactly the tensors listed, all F32 of the listed shapes, of the listed size and
/// SHA-256.
///
/// A missing file is [`BackendError::NotFound`]; anything else wrong (unreadable, bad
/// header, truncated, wrong dtype or shape, checksum mismatch) is [`BackendError::Failed`]
/// naming the file and the problem. Blocking: run it on a blocking thread.
pub fn read_weights(dir: &Path, entry: &ModelEntry) -> Result<MlpWeights, BackendError> {
    let path = dir.join(&entry.file);
    let data = std::fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BackendError::NotFound(format!(
            "model {}: weights file {} does not exist",
            entry.name,
            path.display()
        )),
        _ => BackendError::Failed(format!("model {}: cannot read {}: {e}", entry.name, path.display())),
    })?;
    parse_weights(&data, entry).map_err(|e| {
        BackendError::Failed(format!("model {}: corrupt weights file {}: {e}", entry.name, path.display()))
    })
}

/// Parses and checks the bytes of a weights file; see [`read_weights`].
pub fn parse_weights(data: &[u8], entry: &ModelEntry) -> Result<MlpWeights, String> {
    let tensors = SafeTensors::deserialize(data).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    if tensors.len() != entry.tensors.len() {
        return Err(format!("holds {} tensors, the manifest lists {}", tensors.len(), entry.tensors.len()));
    }
    let mut floats = HashMap::new();
    for expected in &entry.tensors {
        let view =
            tensors.tensor(&expected.name).map_err(|_| format!("tensor {} is missing", expected.name))?;
        floats.insert(expected.name.as_str(), to_f32(&view, expected)?);
    }
    if data.len() as u64 != entry.file_bytes {
        return Err(format!("is {} bytes long, the manifest says {}", data.len(), entry.file_bytes));
    }
    let sha = sha256_hex(data);
    if sha != entry.sha256 {
        return Err(format!("SHA-256 {sha} does not match the manifest's {}", entry.sha256));
    }
    let mut take = |name: &str| floats.remove(name).unwrap_or_default();
    let embed = take("embed");
    let layers = (0..LAYERS)
        .map(|i| Linear {
            weight: take(&format!("layers.{i}.weight")),
            bias: take(&format!("layers.{i}.bias")),
        })
        .collect();
    let head = Linear { weight: take("head.weight"), bias: take("head.bias") };
    Ok(MlpWeights { width: entry.width, embed, layers, head })
}

fn to_f32(view: &TensorView<'_>, expected: &TensorEntry) -> Result<Vec<f32>, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("tensor {} is {:?}, expected F32", expected.name, view.dtype()));
    }
    if view.shape() != expected.shape.as_slice() {
        return Err(format!(
            "tensor {} has shape {:?}, expected {:?}",
            expected.name,
            view.shape(),
            expected.shape
        ));
    }
    let values: Vec<f32> =
        view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("tensor {} holds a non-finite value at index {i}", expected.name));
    }
    Ok(values)
}

/// SplitMix64: a tiny, fixed PRNG, so that a seed gives the same weights on every machine
/// and with every version of every dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        (unit * 2.0 - 1.0) * scale
    }
}

/// The name of model `index`.
pub fn model_name(index: usize) -> String {
    format!("model-{index}")
}

/// The weights of model `index` of a directory made with `seed`, of width `width`: every
/// value is a function of `(seed, index, width)` only.
pub fn generate_weights(seed: u64, index: usize, width: usize) -> MlpWeights {
    let mut rng = SplitMix64(seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut fill = |n: usize, scale: f32| (0..n).map(|_| rng.uniform(scale)).collect::<Vec<_>>();
    // Uniform(-a, a) has variance a²/3: a = sqrt(3/fan_in) keeps activations near unit size.
    let layer_scale = (3.0 / width as f32).sqrt();
    let embed = fill(VOCAB * width, 1.0);
    let layers = (0..LAYERS)
        .map(|_| Linear { weight: fill(width * width, layer_scale), bias: fill(width, 0.1) })
        .collect();
    let head = Linear { weight: fill(OUTPUTS * width, layer_scale), bias: fill(OUTPUTS, 0.1) };
    MlpWeights { width, embed, layers, head }
}

/// `weights` as the bytes of a safetensors file (tensors as [`expected_tensors`] lists them).
pub fn to_safetensors(weights: &MlpWeights, model: &str) -> Result<Vec<u8>, String> {
    let le = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in expected_tensors(weights.width) {
        let values: &[f32] = match t.name.as_str() {
            "embed" => &weights.embed,
            "head.weight" => &weights.head.weight,
            "head.bias" => &weights.head.bias,
            name => {
                let mut parts = name.split('.');
                let layer =
                    parts.nth(1).and_then(|i| i.parse::<usize>().ok()).and_then(|i| weights.layers.get(i));
                match (layer, parts.next()) {
                    (Some(l), Some("weight")) => &l.weight,
                    (Some(l), Some("bias")) => &l.bias,
                    _ => return Err(format!("no tensor {name}")),
                }
            }
        };
        buffers.push((t.name, t.shape, le(values)));
    }
    let mut views = Vec::new();
    for (name, shape, bytes) in &buffers {
        let view =
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(|e| format!("tensor {name}: {e}"))?;
        views.push((name.clone(), view));
    }
    // One key only: the header is JSON written from a HashMap, so with several keys their
    // order, and so the file's bytes and checksum, would change from run to run.
    let metadata = HashMap::from([(FORMAT.to_string(), model.to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// Writes `count` models `model-0 .. model-{count-1}` of about `size_bytes` bytes of weights
/// each (at most that, and at least a width of [`MIN_WIDTH`]) into `dir` (created if needed),
/// deterministic from `seed`, and their `manifest.json`. Nothing is downloaded.
pub fn make_models(dir: &Path, count: usize, size_bytes: u64, seed: u64) -> io::Result<Manifest> {
    std::fs::create_dir_all(dir)?;
    let width = width_for_bytes(size_bytes);
    let mut models = Vec::with_capacity(count);
    for index in 0..count {
        let name = model_name(index);
        let weights = generate_weights(seed, index, width);
        let bytes = to_safetensors(&weights, &name).map_err(io::Error::other)?;
        let file = format!("{name}.safetensors");
        write_atomically(&dir.join(&file), &bytes)?;
        models.push(ModelEntry {
            weight_bytes: weights.bytes(),
            file_bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
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
    fn generation_is_deterministic_and_depends_on_seed_and_index() {
        let a = generate_weights(1, 0, 16);
        assert_eq!(a, generate_weights(1, 0, 16));
        assert_ne!(a, generate_weights(2, 0, 16));
        assert_ne!(a, generate_weights(1, 1, 16));
        assert_eq!(a.bytes(), weight_count(16) * 4);
        // A fixed value, so that the generator cannot drift unnoticed.
        assert_eq!(a.embed.first().map(|v| v.to_bits()), Some(0x3e08_5168));
    }

    #[test]
    fn safetensors_round_trip() {
        let weights = generate_weights(7, 3, 24);
        let bytes = to_safetensors(&weights, "m").unwrap();
        let entry = ModelEntry {
            name: "m".into(),
            file: "m.safetensors".into(),
            file_bytes: bytes.len() as u64,
            weight_bytes: weights.bytes(),
            sha256: sha256_hex(&bytes),
            width: 24,
            tensors: expected_tensors(24),
        };
        check_entry(&entry).unwrap();
        assert_eq!(parse_weights(&bytes, &entry).unwrap(), weights);
    }

    /// A file of `tensors` and a manifest entry that matches it byte for byte (size and
    /// checksum) but describes a proper width-8 model.
    fn crafted(tensors: Vec<(&str, Dtype, Vec<usize>)>) -> (Vec<u8>, ModelEntry) {
        let buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(name, dtype, shape)| {
                let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
                (name.to_string(), dtype, shape, vec![0u8; n])
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(name, dtype, shape, data)| {
                (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap())
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        let entry = ModelEntry {
            name: "m".into(),
            file: "m.safetensors".into(),
            file_bytes: bytes.len() as u64,
            weight_bytes: weight_count(8) * 4,
            sha256: sha256_hex(&bytes),
            width: 8,
            tensors: expected_tensors(8),
        };
        (bytes, entry)
    }

    fn proper(width: usize) -> Vec<(String, Dtype, Vec<usize>)> {
        expected_tensors(width).into_iter().map(|t| (t.name, Dtype::F32, t.shape)).collect()
    }

    fn parse_error(tensors: Vec<(String, Dtype, Vec<usize>)>) -> String {
        let tensors = tensors.iter().map(|(n, d, s)| (n.as_str(), *d, s.clone())).collect();
        let (bytes, entry) = crafted(tensors);
        parse_weights(&bytes, &entry).unwrap_err()
    }

    #[test]
    fn rejects_wrong_dtypes_shapes_and_tensor_sets() {
        // The crafted file itself is fine.
        let tensors = proper(8);
        let ok: Vec<_> = tensors.iter().map(|(n, d, s)| (n.as_str(), *d, s.clone())).collect();
        let (bytes, entry) = crafted(ok);
        assert_eq!(parse_weights(&bytes, &entry).unwrap().bytes(), weight_count(8) * 4);

        let mut f16 = proper(8);
        f16[0].1 = Dtype::F16;
        let err = parse_error(f16);
        assert!(err.contains("tensor embed is F16, expected F32"), "{err}");

        let mut shape = proper(8);
        shape[1].2 = vec![8, 4];
        let err = parse_error(shape);
        assert!(err.contains("tensor layers.0.weight has shape [8, 4], expected [8, 8]"), "{err}");

        let mut missing = proper(8);
        missing.pop();
        let err = parse_error(missing);
        assert!(err.contains("holds 10 tensors, the manifest lists 11"), "{err}");

        let mut renamed = proper(8);
        renamed[0].0 = "embedding".into();
        let err = parse_error(renamed);
        assert!(err.contains("tensor embed is missing"), "{err}");
    }

    #[test]
    fn rejects_truncated_garbled_and_altered_files() {
        let weights = generate_weights(1, 0, 8);
        let bytes = to_safetensors(&weights, "m").unwrap();
        let entry = ModelEntry {
            name: "m".into(),
            file: "m.safetensors".into(),
            file_bytes: bytes.len() as u64,
            weight_bytes: weights.bytes(),
            sha256: sha256_hex(&bytes),
            width: 8,
            tensors: expected_tensors(8),
        };
        let truncated = &bytes[..bytes.len() - 5];
        let err = parse_weights(truncated, &entry).unwrap_err();
        assert!(err.starts_with("not a valid safetensors file"), "{err}");
        let err = parse_weights(&bytes[..3], &entry).unwrap_err();
        assert!(err.starts_with("not a valid safetensors file"), "{err}");
        let mut garbled = bytes.clone();
        garbled[8..16].copy_from_slice(b"garbage!");
        let err = parse_weights(&garbled, &entry).unwrap_err();
        assert!(err.starts_with("not a valid safetensors file"), "{err}");
        // One weight changed: only the checksum can tell.
        let mut altered = bytes.clone();
        let last = altered.len() - 2;
        altered[last] ^= 0x01;
        let err = parse_weights(&altered, &entry).unwrap_err();
        assert!(err.contains("SHA-256"), "{err}");
        // A NaN weight, with a checksum to match.
        let mut nan = weights.clone();
        nan.head.bias[0] = f32::NAN;
        let nan_bytes = to_safetensors(&nan, "m").unwrap();
        let nan_entry = ModelEntry { sha256: sha256_hex(&nan_bytes), ..entry.clone() };
        let err = parse_weights(&nan_bytes, &nan_entry).unwrap_err();
        assert!(err.contains("non-finite"), "{err}");
    }

    #[test]
    fn forward_depends_on_prompt_and_weights() {
        let a = generate_weights(1, 0, 32);
        let b = generate_weights(1, 1, 32);
        let la = a.forward("hello");
        assert_eq!(la.len(), OUTPUTS);
        assert!(la.iter().all(|v| v.is_finite()));
        assert_eq!(la, a.forward("hello"));
        assert_ne!(la, a.forward("olleh"));
        assert_ne!(la, b.forward("hello"));
        assert_eq!(a.forward("").len(), OUTPUTS);
    }

    #[test]
    fn features_and_output_format() {
        let c = prompt_features("ab");
        assert!((c.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(c[usize::from(b'a')] > c[usize::from(b'b')]);
        assert!(prompt_features("").iter().all(|&v| v == 0.0));
        assert_eq!(format_output(&[0.5, -1.0, 2.25, 2.0]), "argmax=2 logits=[0.5000,-1.0000,2.2500,2.0000]");
        assert_eq!(format_output(&[]), "argmax=0 logits=[]");
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn rejects_bad_manifest_entries() {
        let good = ModelEntry {
            name: "m".into(),
            file: "m.safetensors".into(),
            file_bytes: 1,
            weight_bytes: weight_count(8) * 4,
            sha256: "0".repeat(64),
            width: 8,
            tensors: expected_tensors(8),
        };
        check_entry(&good).unwrap();
        for bad in [
            ModelEntry { file: "../m.safetensors".into(), ..good.clone() },
            ModelEntry { file: "/etc/passwd".into(), ..good.clone() },
            ModelEntry { width: 9, ..good.clone() },
            ModelEntry { weight_bytes: 4, ..good.clone() },
            ModelEntry { sha256: "X".repeat(64), ..good.clone() },
        ] {
            assert!(check_entry(&bad).is_err(), "{bad:?}");
        }
    }
}
