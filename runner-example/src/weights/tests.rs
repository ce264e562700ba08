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
    let read =
        |records: &VerifiedRecords| read_host(dir.path(), entry, Some(records), &CheckPool::default(), None);

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
    let loaded = read_into(dir.path(), entry, None, &CheckPool::default(), &mut dst, &mut |_, r, bytes| {
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
    let err = read_into(dir.path(), entry, None, &CheckPool::default(), &mut dst, &mut |_, _, _| {
        Err("device gone".into())
    })
    .unwrap_err();
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
    let (w, _) = read_host(dir.path(), entry, None, &CheckPool::default(), Some(&pool)).unwrap();
    assert_eq!(pool.bytes(), 0);
    assert_eq!(w.to_mlp(), generate_weights(5, 0, entry.width));
}

/// A load of `entry` from `dir` checked in full by `checks`: the result, the buffer, and the
/// ranges handed to `on_chunk`, in order.
fn load_with(
    dir: &Path,
    entry: &ModelEntry,
    checks: &CheckPool,
) -> (Result<Loaded, BackendError>, Vec<u8>, Vec<Range<usize>>) {
    let mut dst = vec![0u8; entry.weight_bytes as usize];
    let mut seen: Vec<Range<usize>> = Vec::new();
    let mut copy = vec![0u8; dst.len()];
    let loaded = read_into(dir, entry, None, checks, &mut dst, &mut |ranges, r, bytes| {
        assert_eq!(ranges.len(), entry.tensors.len());
        assert_eq!(r.len(), bytes.len());
        copy[r.clone()].copy_from_slice(bytes);
        seen.push(r);
        Ok(())
    });
    if loaded.is_ok() {
        assert_eq!(copy, dst, "on_chunk saw the bytes the buffer holds");
    }
    (loaded, dst, seen)
}

/// Thread counts and super-chunk sizes to check a load with: one thread (the load thread),
/// and pools of 2 and 3 threads taking one, two or the default number of chunks at a time.
fn pools() -> Vec<CheckPool> {
    vec![
        CheckPool::new(1),
        CheckPool::with_super_chunk(2, 1),
        CheckPool::with_super_chunk(3, 2),
        CheckPool::new(2),
    ]
}

#[test]
fn a_parallel_full_check_reads_what_one_thread_reads() {
    let dir = tempfile::tempdir().unwrap();
    // Three and a half chunks: several super-chunks of one or two chunks, a short last one.
    let manifest = make_models(dir.path(), 1, (3 * CHUNK + CHUNK / 2) as u64, 11).unwrap();
    let entry = &manifest.models[0];
    let (one, one_bytes, one_seen) = load_with(dir.path(), entry, &CheckPool::new(1));
    let one = one.unwrap();
    assert_eq!(one.checked, Checked::Full);
    assert_eq!(one_seen.len(), 4);
    let want = generate_weights(11, 0, entry.width);
    let host = HostWeights {
        width: entry.width,
        buf: HostBuf::copy_of(&one_bytes, None).unwrap(),
        ranges: one.ranges.clone(),
    };
    assert_eq!(host.to_mlp(), want);
    for checks in pools() {
        let (loaded, bytes, seen) = load_with(dir.path(), entry, &checks);
        let threads = checks.threads();
        assert_eq!(loaded.unwrap(), one, "{threads} threads");
        assert!(bytes == one_bytes, "{threads} threads: other bytes");
        assert_eq!(seen, one_seen, "{threads} threads");
    }
}

#[test]
fn chunks_are_handed_on_in_order_covering_the_buffer_with_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_models(dir.path(), 1, (4 * CHUNK + 1000) as u64, 12).unwrap();
    let entry = &manifest.models[0];
    for checks in pools() {
        let (loaded, bytes, seen) = load_with(dir.path(), entry, &checks);
        assert_eq!(loaded.unwrap().checked, Checked::Full);
        assert_eq!(seen.first().map(|r| r.start), Some(0));
        assert!(seen.windows(2).all(|w| w[0].end == w[1].start), "{seen:?}");
        assert_eq!(seen.last().map(|r| r.end), Some(bytes.len()));
        assert!(seen.iter().all(|r| !r.is_empty() && r.len() <= CHUNK), "{seen:?}");
    }
    // A failing chunk consumer fails a pipelined load too, and is not called again.
    let mut dst = vec![0u8; entry.weight_bytes as usize];
    let mut calls = 0;
    let checks = CheckPool::with_super_chunk(2, 1);
    let err = read_into(dir.path(), entry, None, &checks, &mut dst, &mut |_, _, _| {
        calls += 1;
        Err("device gone".into())
    })
    .unwrap_err();
    assert!(matches!(&err, BackendError::Failed(m) if m.contains("device gone")), "{err:?}");
    assert_eq!(calls, 1);
}

/// Writes `bytes` as the model file of `entry_for(bytes, width, blake3)` into `dir`.
fn write_model(dir: &Path, bytes: &[u8], width: usize, blake3: bool) -> ModelEntry {
    let entry = entry_for(bytes, width, blake3);
    std::fs::write(dir.join(&entry.file), bytes).unwrap();
    entry
}

/// Where the data section of safetensors `bytes` starts.
fn data_start(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// A model of width 800 (about 10 MiB: three super-chunks of one chunk) as file bytes.
fn model_of_width_800() -> Vec<u8> {
    to_safetensors(&generate_weights(13, 0, 800), "m").unwrap()
}

#[test]
fn a_corrupt_byte_in_a_later_super_chunk_fails_the_digest_with_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let good = model_of_width_800();
    let mut bad = good.clone();
    // In the third chunk: the lowest mantissa bit of a weight, still finite.
    let at = data_start(&bad) + 2 * CHUNK + 4 * 1001;
    bad[at] ^= 0x01;
    for blake3 in [true, false] {
        let entry = write_model(dir.path(), &good, 800, blake3);
        std::fs::write(dir.path().join(&entry.file), &bad).unwrap();
        for checks in pools() {
            let (loaded, _, seen) = load_with(dir.path(), &entry, &checks);
            let err = loaded.unwrap_err();
            let digest = if blake3 { "BLAKE3" } else { "SHA-256" };
            assert!(
                matches!(&err, BackendError::Failed(m) if m.contains(digest) && m.contains("does not match the manifest's")),
                "{} threads: {err:?}",
                checks.threads()
            );
            // Only the digest at the end can tell: every chunk was handed on.
            assert_eq!(seen.last().map(|r| r.end), Some(entry.weight_bytes as usize));
        }
    }
}

#[test]
fn a_nan_in_the_second_super_chunk_names_its_tensor_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = model_of_width_800();
    // f32 index of the data: in the second chunk, and another NaN after it.
    let first = CHUNK / 4 + 12_345;
    let start = data_start(&bytes);
    for at in [first, 2 * CHUNK / 4 + 7] {
        bytes[start + 4 * at..start + 4 * at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    // Which tensor that is, from the file's header (safetensors sorts tensors by name).
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let (name, index) = expected_tensors(800)
        .into_iter()
        .find_map(|t| {
            let (from, to) = metadata.info(&t.name).unwrap().data_offsets;
            (from / 4..to / 4).contains(&first).then(|| (t.name.clone(), first - from / 4))
        })
        .unwrap();
    assert_eq!(name, "layers.1.weight");
    let want = format!("tensor {name} holds a non-finite value at index {index}");
    for blake3 in [true, false] {
        let entry = write_model(dir.path(), &bytes, 800, blake3);
        for checks in pools() {
            let (loaded, _, seen) = load_with(dir.path(), &entry, &checks);
            let err = loaded.unwrap_err();
            assert!(
                matches!(&err, BackendError::Failed(m) if m.contains(&want)),
                "{} threads: {err:?}",
                checks.threads()
            );
            // Nothing of the bad chunk, or after it, was handed on.
            assert!(seen.iter().all(|r| r.end <= CHUNK), "{seen:?}");
        }
    }
}

#[test]
fn sha256_manifests_load_with_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = model_of_width_800();
    let entry = write_model(dir.path(), &bytes, 800, false);
    assert_eq!(entry.blake3, None);
    let (one, one_bytes, _) = load_with(dir.path(), &entry, &CheckPool::new(1));
    let one = one.unwrap();
    for checks in pools() {
        let (loaded, got, _) = load_with(dir.path(), &entry, &checks);
        assert_eq!(loaded.unwrap(), one);
        assert!(got == one_bytes);
    }
    let host =
        HostWeights { width: 800, buf: HostBuf::copy_of(&one_bytes, None).unwrap(), ranges: one.ranges };
    assert_eq!(host.to_mlp(), generate_weights(13, 0, 800));
}

#[test]
fn the_pool_threads_are_named_and_started_once() {
    let checks = CheckPool::new(3);
    assert_eq!(checks.threads(), 3);
    let pool = checks.pool().unwrap();
    assert_eq!(pool.current_num_threads(), 3);
    let name = pool.install(|| std::thread::current().name().map(str::to_string));
    assert!(name.is_some_and(|n| n.starts_with("model-check-")));
    assert!(std::ptr::eq(pool, checks.pool().unwrap()));
    // At the load thread's lowered priority: a higher niceness than this thread's.
    #[cfg(target_os = "linux")]
    {
        let nice = || {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            // After the command name in parentheses: state is field 3, nice field 19.
            let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
            fields[16].parse::<i32>().unwrap()
        };
        assert!(pool.install(nice) > nice(), "{} <= {}", pool.install(nice), nice());
    }
    assert!(CheckPool::new(1).pool().is_none());
    assert_eq!(CheckPool::new(0).threads(), 1);
}
