//! The network every model file holds (see [`crate::models`] for the table of tensors), its
//! reference forward pass on the CPU, and the deterministic weights `make-models` writes.
//!
//! The forward pass runs on an [`MlpView`]: borrowed slices, so that the same code serves
//! weights made in memory ([`MlpWeights`]) and weights read from a file into one flat buffer
//! ([`HostWeights`](crate::weights::HostWeights)).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;

use safetensors::tensor::{Dtype, TensorView};

use crate::models::{expected_tensors, FORMAT, LAYERS, OUTPUTS, VOCAB};

/// A fully connected layer: `y = weight · x + bias`, `weight` row-major `[outputs, inputs]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Row-major `[outputs, inputs]`.
    pub weight: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
}

/// A model's weights in host memory, one `Vec` per tensor.
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
        self.tensors().iter().map(|t| t.len() as u64 * 4).sum()
    }

    /// The tensors in [`expected_tensors`] order.
    pub fn tensors(&self) -> Vec<&[f32]> {
        let mut out: Vec<&[f32]> = vec![&self.embed];
        for layer in &self.layers {
            out.push(&layer.weight);
            out.push(&layer.bias);
        }
        out.push(&self.head.weight);
        out.push(&self.head.bias);
        out
    }

    /// The weights as an [`MlpView`].
    pub fn view(&self) -> MlpView<'_> {
        MlpView {
            width: self.width,
            embed: &self.embed,
            layers: self.layers.iter().map(|l| (l.weight.as_slice(), l.bias.as_slice())).collect(),
            head: (&self.head.weight, &self.head.bias),
        }
    }

    /// The logits for `prompt`: the reference forward pass, in f32 on the CPU.
    pub fn forward(&self, prompt: &str) -> Vec<f32> {
        self.view().forward(prompt)
    }
}

/// A model's weights, borrowed: what the forward pass reads.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpView<'a> {
    /// The width `W`.
    pub width: usize,
    /// Row-major `[256, W]`.
    pub embed: &'a [f32],
    /// `(weight [W, W], bias [W])` per hidden layer.
    pub layers: Vec<(&'a [f32], &'a [f32])>,
    /// `(weight [OUTPUTS, W], bias [OUTPUTS])`.
    pub head: (&'a [f32], &'a [f32]),
}

impl<'a> MlpView<'a> {
    /// The view of `floats`, a flat buffer holding the tensors at `ranges` (float indices,
    /// in [`expected_tensors`] order). A missing range gives an empty tensor.
    pub fn from_flat(width: usize, floats: &'a [f32], ranges: &[Range<usize>]) -> Self {
        let at = |i: usize| ranges.get(i).and_then(|r| floats.get(r.clone())).unwrap_or_default();
        Self {
            width,
            embed: at(0),
            layers: (0..LAYERS).map(|i| (at(1 + 2 * i), at(2 + 2 * i))).collect(),
            head: (at(1 + 2 * LAYERS), at(2 + 2 * LAYERS)),
        }
    }

    /// The logits for `prompt`: the reference forward pass, in f32 on the CPU.
    pub fn forward(&self, prompt: &str) -> Vec<f32> {
        let w = self.width;
        let c = prompt_features(prompt);
        let mut x = vec![0.0f32; w];
        for (row, &weight) in self.embed.chunks_exact(w.max(1)).zip(&c) {
            if weight != 0.0 {
                for (xi, ei) in x.iter_mut().zip(row) {
                    *xi += weight * ei;
                }
            }
        }
        let mut y = vec![0.0f32; w];
        for (weight, bias) in &self.layers {
            linear(weight, bias, &x, &mut y);
            for v in &mut y {
                *v = v.tanh();
            }
            std::mem::swap(&mut x, &mut y);
        }
        let mut logits = vec![0.0f32; OUTPUTS];
        linear(self.head.0, self.head.1, &x, &mut logits);
        logits
    }
}

/// `weight · x + bias` into `out`.
fn linear(weight: &[f32], bias: &[f32], x: &[f32], out: &mut [f32]) {
    let inputs = x.len().max(1);
    for ((o, row), b) in out.iter_mut().zip(weight.chunks_exact(inputs)).zip(bias) {
        *o = dot(row, x) + b;
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

/// SplitMix64: a tiny, fixed PRNG, so that a seed gives the same weights on every machine
/// and with every version of every dependency. Its state after `k` draws is
/// `start + k·γ`, so any stretch of the stream can be drawn without the ones before it.
struct SplitMix64(u64);

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl SplitMix64 {
    /// The generator `start` would be after `skip` draws.
    fn skipped(start: u64, skip: u64) -> Self {
        Self(start.wrapping_add(skip.wrapping_mul(GAMMA)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
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

/// Tensor `tensor` (in [`expected_tensors`] order) of model `index` of a directory made with
/// `seed`, of width `width`: the values [`generate_weights`] gives it, drawn on their own.
pub fn tensor_values(seed: u64, index: usize, width: usize, tensor: usize) -> Vec<f32> {
    let shapes = expected_tensors(width);
    let len = |t: &crate::models::TensorEntry| t.shape.iter().product::<usize>();
    let skip: usize = shapes.iter().take(tensor).map(len).sum();
    let n = shapes.get(tensor).map_or(0, len);
    // Uniform(-a, a) has variance a²/3: a = sqrt(3/fan_in) keeps activations near unit size.
    let layer_scale = (3.0 / width as f32).sqrt();
    let scale = match tensor {
        0 => 1.0,
        t if t == 2 * LAYERS + 2 => 0.1,           // head.bias
        t if t <= 2 * LAYERS && t % 2 == 0 => 0.1, // layers.i.bias
        _ => layer_scale,
    };
    let start = seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
    let mut rng = SplitMix64::skipped(start, skip as u64);
    (0..n).map(|_| rng.uniform(scale)).collect()
}

/// The weights of model `index` of a directory made with `seed`, of width `width`: every
/// value is a function of `(seed, index, width)` only.
pub fn generate_weights(seed: u64, index: usize, width: usize) -> MlpWeights {
    let t = |i: usize| tensor_values(seed, index, width, i);
    let layers = (0..LAYERS).map(|i| Linear { weight: t(1 + 2 * i), bias: t(2 + 2 * i) }).collect();
    let head = Linear { weight: t(1 + 2 * LAYERS), bias: t(2 + 2 * LAYERS) };
    MlpWeights { width, embed: t(0), layers, head }
}

/// Little-endian bytes of `values`.
pub(crate) fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// The safetensors header metadata every model file carries. One key only: the header is
/// JSON written from a HashMap, so with several keys their order, and so the file's bytes and
/// checksum, would change from run to run.
pub(crate) fn file_metadata(model: &str) -> HashMap<String, String> {
    HashMap::from([(FORMAT.to_string(), model.to_string())])
}

/// `weights` as the bytes of a safetensors file (tensors as [`expected_tensors`] lists them).
pub fn to_safetensors(weights: &MlpWeights, model: &str) -> Result<Vec<u8>, String> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = expected_tensors(weights.width)
        .into_iter()
        .zip(weights.tensors())
        .map(|(t, values)| (t.name, t.shape, le_bytes(values)))
        .collect();
    let mut views = Vec::new();
    for (name, shape, bytes) in &buffers {
        let view =
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(|e| format!("tensor {name}: {e}"))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, Some(file_metadata(model))).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::weight_count;

    #[test]
    fn generation_is_deterministic_and_depends_on_seed_and_index() {
        let a = generate_weights(1, 0, 16);
        assert_eq!(a, generate_weights(1, 0, 16));
        assert_ne!(a, generate_weights(2, 0, 16));
        assert_ne!(a, generate_weights(1, 1, 16));
        assert_eq!(a.bytes(), weight_count(16) * 4);
        // Fixed values, so that the generator cannot drift unnoticed (the first is from
        // before tensors could be drawn on their own, when the stream was drawn in order).
        assert_eq!(a.embed.first().map(|v| v.to_bits()), Some(0x3e08_5168));
    }

    #[test]
    fn tensors_drawn_alone_continue_the_stream() {
        // The stream drawn in one go, as the generator did before tensor_values existed.
        let (seed, index, width) = (3u64, 2usize, 9usize);
        let mut rng = SplitMix64(seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
        let layer_scale = (3.0 / width as f32).sqrt();
        let mut fill = |n: usize, scale: f32| (0..n).map(|_| rng.uniform(scale)).collect::<Vec<_>>();
        let embed = fill(VOCAB * width, 1.0);
        let layers: Vec<Linear> = (0..LAYERS)
            .map(|_| Linear { weight: fill(width * width, layer_scale), bias: fill(width, 0.1) })
            .collect();
        let head = Linear { weight: fill(OUTPUTS * width, layer_scale), bias: fill(OUTPUTS, 0.1) };
        let in_order = MlpWeights { width, embed, layers, head };
        assert_eq!(generate_weights(seed, index, width), in_order);
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
    fn a_flat_view_computes_what_the_vectors_do() {
        let a = generate_weights(4, 1, 12);
        let mut flat = Vec::new();
        let mut ranges = Vec::new();
        for t in a.tensors() {
            ranges.push(flat.len()..flat.len() + t.len());
            flat.extend_from_slice(t);
        }
        let view = MlpView::from_flat(12, &flat, &ranges);
        assert_eq!(view, a.view());
        assert_eq!(view.forward("x y"), a.forward("x y"));
        // Short of tensors: empty ones, no panic.
        assert_eq!(MlpView::from_flat(12, &flat, &ranges[..3]).forward("x").len(), OUTPUTS);
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
}
