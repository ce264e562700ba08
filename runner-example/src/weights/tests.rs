use std::time::Duration;

use safetensors::tensor::TensorView;

use super::*;
use crate::mlp::{generate_weights, to_safetensors};
use crate::models::{blake3_hex, expected_tensors, make_models, sha256_hex, weight_count, ModelDir};

fn entry_for(bytes: &[u8], width: usize, blake3: bool) -> ModelEntry {
    ModelEntry {
        name: "m".into(),
        file: "m.safetensors".into(),
        file_bytes: bytes.len() as u64,
        weight_bytes: weight_count(width) * 4,
        sha256: sha256_hex(bytes),
        blake3: blake3.then(|| blake3_hex(bytes)),
        width,
        tensors: expected_tensors(width),
    }
}

#[test]
fn safetensors_round_trip() {
    let weights = generate_weights(7, 3, 24);
    let bytes = to_safetensors(&weights, "m").unwrap();
    for blake3 in [true, false] {
        assert_eq!(parse_weights(&bytes, &entry_for(&bytes, 24, blake3)).unwrap(), weights);
    }
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
    let entry = entry_for(&bytes, 8, true);
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
    let entry = entry_for(&bytes, 8, true);
    let truncated = &bytes[..bytes.len() - 5];
    let err = parse_weights(truncated, &entry).unwrap_err();
    assert!(err.starts_with("not a valid safetensors file"), "{err}");
    let err = parse_weights(&bytes[..3], &entry).unwrap_err();
    assert!(err.starts_with("not a valid safetensors file"), "{err}");
    let mut garbled = bytes.clone();
    garbled[8..16].copy_from_slice(b"garbage!");
    let err = parse_weights(&garbled, &entry).unwrap_err();
    assert!(err.starts_with("not a valid safetensors file"), "{err}");
    let mut huge_header = bytes.clone();
    huge_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = parse_weights(&huge_header, &entry).unwrap_err();
    assert!(err.starts_with("not a valid safetensors file"), "{err}");
    // A longer file than the manifest says, consistent in itself.
    let longer = to_safetensors(&generate_weights(1, 0, 8), "a longer name").unwrap();
    let err = parse_weights(&longer, &entry).unwrap_err();
    assert!(err.contains("bytes long, the manifest says"), "{err}");
    // One weight changed: only the checksum can tell, with either digest.
    let mut altered = bytes.clone();
    let last = altered.len() - 2;
    altered[last] ^= 0x01;
    let err = parse_weights(&altered, &entry).unwrap_err();
    assert!(err.contains("BLAKE3") && err.contains("does not match the manifest's"), "{err}");
    let err = parse_weights(&altered, &entry_for(&bytes, 8, false)).unwrap_err();
    assert!(err.contains("SHA-256") && err.contains("does not match the manifest's"), "{err}");
    // A NaN weight, with a checksum to match.
    let mut nan = weights.clone();
    nan.head.bias[0] = f32::NAN;
    let nan_bytes = to_safetensors(&nan, "m").unwrap();
    let err = parse_weights(&nan_bytes, &entry_for(&nan_bytes, 8, true)).unwrap_err();
    assert!(err.contains("tensor head.bias holds a non-finite value at index 0"), "{err}");
    let mut inf = weights;
    inf.layers[2].weight[5] = f32::NEG_INFINITY;
    let inf_bytes = to_safetensors(&inf, "m").unwrap();
    let err = parse_weights(&inf_bytes, &entry_for(&inf_bytes, 8, true)).unwrap_err();
    assert!(err.contains("tensor layers.2.weight holds a non-finite value at index 5"), "{err}");
}

#[test]
fn non_finite_values_are_found_anywhere() {
    let mut chunk: Vec<u8> = (0..64).flat_map(|i| (i as f32).to_le_bytes()).collect();
    assert_eq!(first_non_finite(&chunk), None);
    chunk[37 * 4..38 * 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_eq!(first_non_finite(&chunk), Some(37));
    // Unaligned input takes the slow path and finds the same.
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&chunk);
    assert_eq!(first_non_finite(&shifted[1..]), Some(37));
}

#[test]
fn a_file_changed_within_settle_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    make_models(dir.path(), 1, 64 << 10, 3).unwrap();
    let models = ModelDir::open(dir.path()).unwrap();
    // Just written: its change time is "now", so its check is not recorded.
    assert_eq!(models.read_host("model-0", None).unwrap().1, Checked::Full);
    assert_eq!(models.read_host("model-0", None).unwrap().1, Checked::Full);
    assert!(models.records().is_empty());
    let id = FileIdentity::of(&File::open(dir.path().join("model-0.safetensors")).unwrap()).unwrap().unwrap();
    assert!(!id.settled(SystemTime::now(), SETTLE));
    assert!(id.settled(SystemTime::now() + SETTLE, SETTLE));
}

#[test]
fn an_unchanged_file_is_checked_once_and_a_changed_one_again() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_models(dir.path(), 1, 64 << 10, 3).unwrap();
    let entry = &manifest.models[0];
    let path = dir.path().join(&entry.file);
    let want = generate_weights(3, 0, entry.width);
    let good = std::fs::read(&path).unwrap();
    let records = VerifiedRecords::with_settle(Duration::ZERO);
    let read = |records: &VerifiedRecords| read_host(dir.path(), entry, Some(records), None);

    let (w, checked) = read(&records).unwrap();
    assert_eq!((checked, w.to_mlp() == want), (Checked::Full, true));
    let (w, checked) = read(&records).unwrap();
    assert_eq!((checked, w.to_mlp() == want), (Checked::Recorded, true));
    let identity = FileIdentity::of(&File::open(&path).unwrap()).unwrap().unwrap();

    // Any write changes mtime and ctime: the next read checks everything, and finds the flip.
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&path, &flipped).unwrap();
    let err = read(&records).unwrap_err();
    assert!(matches!(&err, BackendError::Failed(m) if m.contains("BLAKE3")), "{err:?}");
    assert!(records.is_empty());

    // Changed, then its modification time put back (the record put back too, as if the
    // change had happened after the last good load): the change time still tells.
    records.set(&entry.name, Some(identity));
    let file = File::options().write(true).open(&path).unwrap();
    let mtime = SystemTime::UNIX_EPOCH + Duration::new(identity.mtime.0 as u64, identity.mtime.1 as u32);
    file.set_modified(mtime).unwrap();
    drop(file);
    let now = FileIdentity::of(&File::open(&path).unwrap()).unwrap().unwrap();
    assert_eq!(now.mtime, identity.mtime);
    assert_ne!(now, identity);
    let err = read(&records).unwrap_err();
    assert!(matches!(&err, BackendError::Failed(m) if m.contains("BLAKE3")), "{err:?}");

    // Replaced (a rename: another inode) by the right contents: checked in full, loads.
    let tmp = dir.path().join("replacement");
    std::fs::write(&tmp, &good).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let (w, checked) = read(&records).unwrap();
    assert_eq!((checked, w.to_mlp() == want), (Checked::Full, true));
    assert_eq!(read(&records).unwrap().1, Checked::Recorded);
}

#[test]
fn chunks_arrive_in_order_and_cover_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    // Bigger than two chunks.
    let manifest = make_models(dir.path(), 1, (2 * CHUNK + CHUNK / 2) as u64, 9).unwrap();
    let entry = &manifest.models[0];
    let mut dst = vec![0u8; entry.weight_bytes as usize];
    let mut seen: Vec<Range<usize>> = Vec::new();
    let mut copy = Vec::new();
    let loaded = read_into(dir.path(), entry, None, &mut dst, &mut |_, r, bytes| {
        assert_eq!(r.len(), bytes.len());
        copy.extend_from_slice(bytes);
        seen.push(r);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.first().map(|r| r.start), Some(0));
    assert!(seen.windows(2).all(|w| w[0].end == w[1].start));
    assert_eq!(seen.last().map(|r| r.end), Some(dst.len()));
    assert_eq!(copy, dst);
    assert_eq!(loaded.checked, Checked::Full);
    // A failing chunk consumer fails the load.
    let err =
        read_into(dir.path(), entry, None, &mut dst, &mut |_, _, _| Err("device gone".into())).unwrap_err();
    assert!(matches!(&err, BackendError::Failed(m) if m.contains("device gone")), "{err:?}");
}

#[test]
fn the_pool_lends_the_last_buffer_to_a_load_that_fits() {
    let pool = BufferPool::default();
    assert!(pool.take(16).is_none());
    let mut buf = HostBuf::zeroed(64).unwrap();
    buf.bytes_mut().fill(7);
    pool.give(buf);
    assert_eq!(pool.bytes(), 64);
    // Too big a buffer for 16 bytes (more than twice): freed, not lent.
    assert!(pool.take(16).is_none());
    assert_eq!(pool.bytes(), 0);
    pool.give(HostBuf::zeroed(64).unwrap());
    let lent = pool.take(40).unwrap();
    assert_eq!(lent.len(), 40);
    assert_eq!(lent.floats().len(), 10);
    assert!(pool.take(40).is_none(), "one buffer, lent once");

    // A load through the pool reads into the lent buffer, and the weights are right.
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_models(dir.path(), 1, 64 << 10, 5).unwrap();
    let entry = &manifest.models[0];
    let mut stale = HostBuf::zeroed(entry.weight_bytes as usize).unwrap();
    stale.bytes_mut().fill(0xff); // NaNs everywhere: must all be overwritten
    pool.give(stale);
    let (w, _) = read_host(dir.path(), entry, None, Some(&pool)).unwrap();
    assert_eq!(pool.bytes(), 0);
    assert_eq!(w.to_mlp(), generate_weights(5, 0, entry.width));
}
