//! Fuzz targets: every parser and decoder that reads bytes from outside, as
//! `fn(&[u8])` functions that must never panic, abort, hang or allocate without bound on any
//! input. Errors are the expected outcome for most inputs and are ignored (or, where the API
//! returns data, the data is walked so that lazy accessors run too).
//!
//! The engine lives elsewhere: `fuzz/` (not a workspace member) wraps [`run`] in `afl::fuzz!`
//! under `cargo afl`, and `scripts/fuzz.sh TARGET SECONDS` runs one target. The targets live
//! here, in a crate CI builds without AFL, so that `tools/tests/fuzz_replay.rs` can replay every
//! seed (`fuzz/corpus/TARGET/`) and every past finding (`fuzz/regressions/TARGET/`) on each test
//! run. APIs that take a path get the bytes written to a file in a per-process scratch directory
//! ([`scratch_dir`]).
//!
//! [`AllocLimit`] is the allocator both the AFL binary and the replay test run under: one
//! allocation above [`MAX_ALLOC_BYTES`] aborts with a message, so that a header claiming a huge
//! size shows up as a crash instead of as an out-of-memory kill or a slow, swapping run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One fuzz target: a name (also its corpus folder) and the function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name. `fuzz/corpus/NAME/` holds each one's seeds.
pub const TARGETS: &[Target] = &[
    ("shard_index", shard_index),
    ("manifest", manifest),
    ("shard_reader", shard_reader),
    ("jpeg_sniff", jpeg_sniff),
    ("jpeg_turbo", jpeg_turbo),
    ("jpeg_zune", jpeg_zune),
    ("image_convert", image_convert),
    ("rand_augment", rand_augment),
    ("recipe", recipe),
    ("idx", idx),
    ("weights", weights),
    ("checkpoint_sidecar", checkpoint_sidecar),
    ("imagenet_labels", imagenet_labels),
    ("import_pickle", import_pickle),
    ("import_mat", import_mat),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Runs target `name` on `data`; panics if there is no such target.
pub fn run(name: &str, data: &[u8]) {
    let f = target(name).unwrap_or_else(|| {
        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        panic!("unknown fuzz target {name:?}: expected one of {names:?}")
    });
    f(data)
}

/// The largest single allocation [`AllocLimit`] allows: 1 GiB. Every legitimate input of the
/// targets needs far less; the decoders refuse images above
/// [`loader::decode::MAX_IMAGE_PIXELS`] (537 MB as RGB) before allocating.
pub const MAX_ALLOC_BYTES: usize = 1 << 30;

/// A global allocator that aborts on any allocation above [`MAX_ALLOC_BYTES`]: install it with
/// `#[global_allocator] static A: AllocLimit = AllocLimit;` in a fuzz or replay binary.
pub struct AllocLimit;

fn too_big(size: usize) -> ! {
    // No allocation here: the message is written with a stack buffer.
    use std::io::Write;
    let mut buf = [0u8; 160];
    let mut w = &mut buf[..];
    let _ = writeln!(
        w,
        "fuzz: allocation of {size} bytes exceeds the {MAX_ALLOC_BYTES}-byte limit (unbounded allocation)"
    );
    let n = 160 - w.len();
    let _ = std::io::stderr().write_all(&buf[..n]);
    std::process::abort()
}

// SAFETY: every method forwards to `System` with the same arguments, after a size check that
// either passes or aborts the process; `System` upholds the `GlobalAlloc` contract.
unsafe impl GlobalAlloc for AllocLimit {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC_BYTES {
            too_big(layout.size())
        }
        // SAFETY: forwarded unchanged (see the impl's note).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC_BYTES {
            too_big(layout.size())
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC_BYTES {
            too_big(new_size)
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// This process's scratch directory (`/dev/shm/rsb-fuzz-PID`, or under the temp directory where
/// there is no `/dev/shm`), created on first use. Directories of processes that no longer run
/// are removed then, since AFL restarts the target process many times.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("rsb-fuzz-")) else {
                    continue;
                };
                if Path::new("/proc").is_dir() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("rsb-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz scratch directory");
        dir
    })
}

/// Writes `data` to `name` in the scratch directory and returns its path.
fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("creating a scratch folder");
    }
    std::fs::write(&path, data).expect("writing a scratch file");
    path
}

/// Splits `data` into `N` parts, each but the last preceded by a little-endian u32 length
/// (clamped to what remains), the last taking the rest. See [`pack`].
pub fn unpack<const N: usize>(mut data: &[u8]) -> [&[u8]; N] {
    let mut parts = [&[][..]; N];
    for part in parts.iter_mut().take(N - 1) {
        let n = match data.get(..4) {
            Some(b) => u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize,
            None => data.len(),
        };
        data = data.get(4..).unwrap_or(&[]);
        let n = n.min(data.len());
        *part = &data[..n];
        data = &data[n..];
    }
    parts[N - 1] = data;
    parts
}

/// The inverse of [`unpack`]: the input of a multi-file target.
pub fn pack(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

/// `shards::ShardIndex::parse`, then every entry and key of an accepted index.
pub fn shard_index(data: &[u8]) {
    let path = Path::new("fuzz/train-000000.idx");
    if let Ok(idx) = shards::ShardIndex::parse(data, path, Path::new("fuzz/train-000000.tar")) {
        for i in 0..idx.len() {
            let _ = (idx.entry(i), idx.key(i));
        }
        let _ = idx.tar_bytes();
    }
}

/// `shards::Manifest::parse`.
pub fn manifest(data: &[u8]) {
    let _ = shards::Manifest::parse(data, Path::new("fuzz/manifest.json"));
}

/// A whole shard set from arbitrary files: [`pack`]ed `manifest.json`, then
/// `train/train-000000.idx`, then `train/train-000000.tar` (the rest). Opens the set, every
/// split the manifest names, reads (with CRC check) every sample of up to 4096, and runs the
/// verifier.
pub fn shard_reader(data: &[u8]) {
    let [manifest, idx, tar] = unpack::<3>(data);
    let root = scratch_dir().join("shard_reader");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("train")).expect("creating a scratch folder");
    std::fs::write(root.join("manifest.json"), manifest).expect("writing a scratch file");
    std::fs::write(root.join("train/train-000000.idx"), idx).expect("writing a scratch file");
    std::fs::write(root.join("train/train-000000.tar"), tar).expect("writing a scratch file");
    if let Ok(ds) = shards::Dataset::open(&root) {
        let names: Vec<String> = ds.manifest().splits.keys().cloned().collect();
        for name in names {
            if let Ok(split) = ds.split(&name) {
                for i in 0..split.len().min(4096) {
                    let _ = split.get_checked(i);
                }
                let _ = split.get(split.len());
            }
        }
        let _ = shards::verify(&root, 1, &|_| {});
    }
}

/// The sharder's header sniffing (`tools::sniff`) and the loader's header-only size read.
pub fn jpeg_sniff(data: &[u8]) {
    let _ = crate::sniff::sniff(data);
    let _ = loader::decode::jpeg_size(data);
}

/// Largest image (pixels) the decode targets decode: the decoders accept up to
/// [`loader::decode::MAX_IMAGE_PIXELS`], but a 100 MB decode per input would make the fuzzer
/// crawl, and larger images run the same code. Headers are still parsed for every input, and
/// images above the limit are decoded too (the decoders must refuse them before allocating).
const FUZZ_DECODE_PIXELS: u64 = 1 << 22;

fn decode_with(kind: loader::DecoderKind, data: &[u8]) {
    use loader::decode::{CropRequest, DecodeOptions, Decoder};
    use loader::transform::CropBox;
    let mut d = Decoder::new(kind).expect("decoder");
    let Ok((w, h)) = d.size(data) else { return };
    let pixels = w as u64 * h as u64;
    if pixels > FUZZ_DECODE_PIXELS && pixels <= loader::decode::MAX_IMAGE_PIXELS {
        return;
    }
    let mut out = Vec::new();
    let _ = d.decode(data, None, DecodeOptions::default(), &mut out);
    // A crop in the lower right quarter, at the smallest scale that keeps 8 pixels (region
    // and DCT-scaled decoding), then an eval-style one that reads around the crop.
    let crop = CropBox {
        left: w as f64 / 2.0,
        top: h as f64 / 3.0,
        width: w as f64 / 2.0,
        height: h as f64 * 2.0 / 3.0,
    };
    for (size, in_image) in [(8, false), (3, true)] {
        let req = CropRequest {
            crop,
            size,
            in_image,
        };
        let _ = d.decode(data, Some(req), DecodeOptions::default(), &mut out);
    }
    // The whole per-sample path: size, geometry, region decode, resize, flip.
    for transform in [loader::Transform::train(16), loader::Transform::eval(16)] {
        let mut p =
            loader::sample::SampleProcessor::new(transform, kind, DecodeOptions::default(), None)
                .expect("sample processor");
        let mut img = vec![0u8; 16 * 16 * 3];
        let _ = p.process(data, 1, 2, 3, &mut img);
    }
}

/// The loader's libjpeg-turbo path: header, full decode, region and DCT-scaled decodes, and
/// the per-sample train and eval transforms (CMYK falls through to zune-jpeg, as in training).
pub fn jpeg_turbo(data: &[u8]) {
    if let Ok(kind) = "turbo".parse::<loader::DecoderKind>() {
        decode_with(kind, data);
    }
}

/// The loader's zune-jpeg path (the decoder for CMYK and for builds without libjpeg-turbo).
pub fn jpeg_zune(data: &[u8]) {
    decode_with(loader::DecoderKind::Zune, data);
}

/// The sharder's re-encode path for CMYK JPEGs and PNGs (`image`'s decoders), for inputs whose
/// header the sniffer accepts (JPEGs up to 4 Mpixel, as for the loader's decoders; `image`
/// bounds its own allocations at 512 MB).
pub fn image_convert(data: &[u8]) {
    match crate::sniff::sniff(data) {
        Err(_) => return,
        Ok(crate::sniff::Kind::Jpeg(j))
            if j.width as u64 * j.height as u64 > FUZZ_DECODE_PIXELS =>
        {
            return
        }
        Ok(_) => {}
    }
    if let Ok(p) = crate::convert::decode(data) {
        if p.width as u64 * p.height as u64 <= FUZZ_DECODE_PIXELS {
            let _ = crate::convert::encode_jpeg(&p, 90);
        }
    }
}

/// `RandAugmentConfig::parse` (the first line), then the config drawn and applied to a small
/// image with several seeds.
pub fn rand_augment(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let line = text.lines().next().unwrap_or("");
    let Ok(config) = loader::RandAugmentConfig::parse(line) else {
        return;
    };
    let ra = loader::RandAugment::new(config);
    let size = 12u32;
    for seed in 0..4 {
        let mut rng = loader::rng::Rng::new(seed);
        let mut img: Vec<u8> = (0..size * size * 3).map(|i| (i * 37 % 251) as u8).collect();
        loader::Augment::apply(&ra, &mut img, size, &mut rng);
    }
}

/// A recipe TOML and `--set` overrides: the text up to a line `---` is parsed as a complete
/// recipe and laid over the A3 preset as a partial one; each later line is one `--set`.
pub fn recipe(data: &[u8]) {
    use trainer::recipe::Recipe;
    let text = String::from_utf8_lossy(data);
    let (toml_text, sets) = match text.split_once("\n---\n") {
        Some((t, s)) => (t, s),
        None => (&text[..], ""),
    };
    let sets: Vec<&str> = sets.lines().collect();
    let check = |r: &Recipe| {
        let _ = r.validate();
        let _ = r.diff(&Recipe::a3());
        if let Ok(t) = r.to_toml_string() {
            let _ = Recipe::from_toml_str(&t);
        }
    };
    if let Ok(r) = Recipe::from_toml_str(toml_text) {
        check(&r);
    }
    if let Ok(r) = Recipe::a3().merged_with_toml_str(toml_text, "fuzz.toml") {
        check(&r);
        if let Ok(r) = r.with_overrides(&sets) {
            check(&r);
        }
    }
    if let Ok(r) = Recipe::a2().with_overrides(&sets) {
        check(&r);
    }
    for name in Recipe::PRESETS.iter().copied().chain(sets.first().copied()) {
        let _ = Recipe::preset(name);
    }
}

/// The Fashion-MNIST IDX reader (images and labels, plain or gzip), then every image.
pub fn idx(data: &[u8]) {
    let path = scratch_file("idx/file-idx-ubyte", data);
    if let Ok(images) = crate::fashion_mnist::read_idx_images(&path) {
        for i in 0..images.count.min(64) {
            let _ = images.image(i);
        }
    }
    let _ = crate::fashion_mnist::read_idx_labels(&path, 10);
}

/// Weight files: `trainer::weights::read` (safetensors or a `.pth` zip), then the checkpoint
/// loaders on them: weights into a small network (`fc.weight` 3x2, `fc.bias` 3) and the same
/// file as a LAMB and an SGD optimizer state.
pub fn weights(data: &[u8]) {
    use candle_core::{DType, Device};
    use trainer::optim::{param_groups, Lamb, LambConfig, Sgd, SgdConfig};
    let path = scratch_file("weights/w.pth", data);
    let _ = trainer::weights::read(&path, &Device::Cpu);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let init = candle_nn::Init::Const(0.5);
    vb.get_with_hints((3, 2), "fc.weight", init).expect("var");
    vb.get_with_hints(3, "fc.bias", init).expect("var");
    let _ = trainer::checkpoint::load_weights(&varmap, &path);
    let vars = || -> Vec<(String, candle_core::Var)> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    if let Ok(mut lamb) = Lamb::new(param_groups(vars(), 0.01), LambConfig::default()) {
        let _ = trainer::checkpoint::load_optimizer(&mut lamb, &path, &Device::Cpu);
    }
    if let Ok(mut sgd) = Sgd::new(param_groups(vars(), 0.01), SgdConfig::default()) {
        let _ = trainer::checkpoint::load_optimizer(&mut sgd, &path, &Device::Cpu);
    }
}

/// A checkpoint directory: [`pack`]ed `latest` (the pointer), then the sidecar JSON it names
/// (written as `step-1.json`, whatever the pointer says); `checkpoint::latest` reads both.
pub fn checkpoint_sidecar(data: &[u8]) {
    let [latest, sidecar] = unpack::<2>(data);
    let dir = scratch_dir().join("checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    std::fs::write(dir.join("latest"), latest).expect("writing a scratch file");
    std::fs::write(dir.join("step-1.json"), sidecar).expect("writing a scratch file");
    let _ = trainer::checkpoint::latest(&dir);
}

/// The ImageNet importers' text files: `source::read_synsets` and `source::read_val_labels`
/// (Kaggle CSV or `file label` lines) on the same bytes, with two known wnids.
pub fn imagenet_labels(data: &[u8]) {
    let path = scratch_file("labels/val_labels.txt", data);
    let _ = crate::source::read_synsets(&path);
    let class_of: std::collections::HashMap<&str, u32> =
        [("n01440764", 0), ("n01443537", 1)].into_iter().collect();
    let _ = crate::source::read_val_labels(&path, &class_of, 2);
    let _ = crate::source::read_val_labels(&path, &class_of, 0);
}

/// `import-dataset`'s Python pickle reader (CIFAR's batches), then every value walked.
pub fn import_pickle(data: &[u8]) {
    if let Ok(v) = crate::import::pickle::load(data) {
        let _ = (v.kind(), v.as_text(), v.get("data"), v.get("labels"));
        for item in v.items().unwrap_or_default().iter().take(64) {
            let _ = (item.kind(), item.as_text());
        }
    }
}

/// `import-dataset`'s MATLAB v5 reader (Flowers-102, Stanford Cars), then every variable.
pub fn import_mat(data: &[u8]) {
    if let Ok(vars) = crate::import::mat::read_mat(data) {
        for (_, v) in vars.iter().take(64) {
            let _ = (v.kind(), v.numbers(), v.text(), v.len(), v.is_empty());
            let _ = v.field(0, "class");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_are_inverse_and_unpack_takes_any_bytes() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"rest of it"];
        assert_eq!(unpack::<3>(&pack(&parts)), parts);
        assert_eq!(unpack::<3>(b"\xff\xff\xff\xffab"), [&b"ab"[..], b"", b""]);
        assert_eq!(unpack::<2>(b"\x01"), [&b""[..], b""]);
    }

    #[test]
    fn target_names_are_unique_and_unknown_ones_are_refused() {
        let mut names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
        assert!(target("manifest").is_some() && target("nope").is_none());
    }
}
