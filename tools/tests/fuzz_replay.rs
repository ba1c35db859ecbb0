//! Replays every fuzz seed (`fuzz/corpus/TARGET/`) and every past finding
//! (`fuzz/regressions/TARGET/`) through its target in `tools::fuzz_targets`, under the same
//! allocation limit as the AFL binary: a panic, an abort or an allocation above
//! `MAX_ALLOC_BYTES` fails the test. This is the part of the fuzzing that CI runs.
//!
//! The seeds are written by `write_seed_corpora` (ignored; run it with
//! `cargo test -p tools --test fuzz_replay -- --ignored write_seed_corpora`), except the `.pth`
//! files, which come from torch (`benches/runs/2026-12-06-fuzz/command.txt` has the script),
//! and the `import_*` seeds, copies of `tools/tests/fixtures/import` files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tools::fuzz_targets::{self, AllocLimit, TARGETS};

#[global_allocator]
static ALLOC: AllocLimit = AllocLimit;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut v: Vec<PathBuf> = entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

#[test]
fn every_seed_and_regression_input_runs_without_panicking() {
    let start = Instant::now();
    let mut total = 0;
    for (name, f) in TARGETS {
        let mut files = files_in(&fuzz_dir().join("corpus").join(name));
        assert!(!files.is_empty(), "no seeds for fuzz target {name}");
        files.extend(files_in(&fuzz_dir().join("regressions").join(name)));
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let t = Instant::now();
            f(&data);
            let s = t.elapsed().as_secs_f64();
            assert!(s < 5.0, "{name}: {} took {s:.1} s", file.display());
            total += 1;
        }
    }
    eprintln!(
        "replayed {total} inputs in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn the_targets_table_names_exactly_the_corpus_folders() {
    let folders = |sub: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(fuzz_dir().join(sub))
            .map(|rd| {
                rd.map(|e| e.unwrap())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(folders("corpus"), names);
    for r in folders("regressions") {
        assert!(
            names.contains(&r),
            "fuzz/regressions/{r} names no fuzz target"
        );
    }
}

// ---- seed corpora ----------------------------------------------------------------------------

fn pixels(w: u16, h: u16, c: usize) -> Vec<u8> {
    (0..w as usize * h as usize * c)
        .map(|i| ((i * 37 + i / 97 * 11) % 251) as u8)
        .collect()
}

fn jpeg(
    w: u16,
    h: u16,
    ct: jpeg_encoder::ColorType,
    setup: impl Fn(&mut jpeg_encoder::Encoder<&mut Vec<u8>>),
) -> Vec<u8> {
    let c = match ct {
        jpeg_encoder::ColorType::Luma => 1,
        jpeg_encoder::ColorType::Cmyk => 4,
        _ => 3,
    };
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, 85);
    setup(&mut enc);
    enc.encode(&pixels(w, h, c), w, h, ct).unwrap();
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand when the formats change"]
fn write_seed_corpora() {
    use jpeg_encoder::{ColorType, SamplingFactor};
    let jpegs: Vec<(&str, Vec<u8>)> = vec![
        ("baseline_420.jpg", jpeg(40, 24, ColorType::Rgb, |_| {})),
        (
            "baseline_444_restart.jpg",
            jpeg(24, 17, ColorType::Rgb, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_4_4);
                e.set_restart_interval(2);
            }),
        ),
        (
            "progressive.jpg",
            jpeg(33, 20, ColorType::Rgb, |e| e.set_progressive(true)),
        ),
        ("grey.jpg", jpeg(17, 9, ColorType::Luma, |_| {})),
        ("cmyk.jpg", jpeg(16, 16, ColorType::Cmyk, |_| {})),
    ];
    for (name, bytes) in &jpegs {
        for target in ["jpeg_sniff", "jpeg_turbo", "jpeg_zune", "image_convert"] {
            write(target, name, bytes);
        }
    }
    let truncated = &jpegs[0].1[..jpegs[0].1.len() * 3 / 4];
    write("jpeg_sniff", "truncated.jpg", truncated);
    let mut png = Vec::new();
    image::RgbaImage::from_raw(5, 3, pixels(5, 3, 4))
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    write("image_convert", "rgba.png", &png);
    write("jpeg_sniff", "rgba.png", &png);

    // A tiny data set through the real tools: two classes, three JPEGs, one shard.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for (i, (wnid, (_, bytes))) in [
        ("n01440764", &jpegs[0]),
        ("n01440764", &jpegs[2]),
        ("n01443537", &jpegs[3]),
    ]
    .into_iter()
    .enumerate()
    {
        let d = src.join("train").join(wnid);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{wnid}_{i}.JPEG")), bytes).unwrap();
    }
    let dst = tmp.path().join("shards");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_shard-imagenet"))
        .arg(&src)
        .arg(&dst)
        .arg("-q")
        .status()
        .unwrap();
    assert!(status.success());
    let manifest = std::fs::read(dst.join("manifest.json")).unwrap();
    let idx = std::fs::read(dst.join("train/train-000000.idx")).unwrap();
    let tar = std::fs::read(dst.join("train/train-000000.tar")).unwrap();
    write("manifest", "manifest.json", &manifest);
    write("shard_index", "train-000000.idx", &idx);
    write(
        "shard_reader",
        "one_shard.bin",
        &fuzz_targets::pack(&[&manifest, &idx, &tar]),
    );

    for (i, s) in [
        "rand-m9-mstd0.5-inc1",
        "rand-m7-n3-mmax12",
        "rand-m6-mstd101",
    ]
    .iter()
    .enumerate()
    {
        write("rand_augment", &format!("config{i}.txt"), s.as_bytes());
    }

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/golden/recipes");
    write(
        "recipe",
        "a3.toml",
        &std::fs::read(golden.join("a3.toml")).unwrap(),
    );
    write(
        "recipe",
        "partial_with_sets.toml",
        b"[optim]\nlr = 4e-3\n[schedule]\nepochs = 2\n---\naugment.rand_augment=\"rand-m6-mstd0.5\"\n\
          data.train_size_px=128\nloss.target_threshold=0.2\noptim.lr=1\n",
    );

    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5];
    images.extend(pixels(4, 5, 3));
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 3];
    labels.extend([0, 9, 4]);
    write("idx", "images-idx3-ubyte", &images);
    write("idx", "labels-idx1-ubyte", &labels);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &images).unwrap();
    write("idx", "images-idx3-ubyte.gz", &gz.finish().unwrap());

    // Weights and optimizer state as `train` writes them (the .pth seeds come from torch).
    {
        use candle_core::{DType, Device};
        use trainer::optim::TrainOptimizer;
        let dir = tempfile::tempdir().unwrap();
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((3, 2), "fc.weight", candle_nn::Init::Const(0.5))
            .unwrap();
        vb.get_with_hints(3, "fc.bias", candle_nn::Init::Const(0.0))
            .unwrap();
        let mut vars: Vec<(String, candle_core::Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut lamb = trainer::optim::Lamb::new(
            trainer::optim::param_groups(vars, 0.01),
            trainer::optim::LambConfig::default(),
        )
        .unwrap();
        let loss = w.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let _ = lamb.step(&grads, 1e-3);
        let state = trainer::checkpoint::RunState {
            format_version: trainer::checkpoint::FORMAT_VERSION,
            step: 1,
            epoch: 0,
            loader: loader::LoaderState {
                epoch: 0,
                next_batch: 1,
            },
            seed: 0,
            recipe_hash: "0".repeat(64),
            weights: String::new(),
            optimizer: String::new(),
            world_size: 1,
            accum_steps: 1,
            metrics_window: None,
        };
        let ck = trainer::checkpoint::save(dir.path(), &varmap, &lamb, state).unwrap();
        write(
            "weights",
            "weights.safetensors",
            &std::fs::read(&ck.weights_path).unwrap(),
        );
        write(
            "weights",
            "lamb.optim.safetensors",
            &std::fs::read(&ck.optimizer_path).unwrap(),
        );
        let sidecar = std::fs::read(&ck.sidecar_path).unwrap();
        write(
            "checkpoint_sidecar",
            "step-1.bin",
            &fuzz_targets::pack(&[b"step-1\n", &sidecar]),
        );
    }

    write(
        "imagenet_labels",
        "LOC_val_solution.csv",
        b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 10 20 30 40 n01440764 1 2 3 4\n\
          ILSVRC2012_val_00000002,n01443537 0 0 5 5\n",
    );
    write(
        "imagenet_labels",
        "val_labels.txt",
        b"ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG n01443537\n",
    );
    write(
        "imagenet_labels",
        "LOC_synset_mapping.txt",
        b"n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n",
    );
}
