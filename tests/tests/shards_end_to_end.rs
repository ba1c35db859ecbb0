//! End to end on generated data: make-imagenet-like -> shard-imagenet -> shards reader/verify.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use shards::{Dataset, ShardIndex};
use tools::sharding::{run, Report, ShardOptions};
use tools::sniff::{sniff, Kind};
use tools::synth::{generate, SynthOptions, ValLayout};

fn synth(dir: &Path, oddities: bool, layout: ValLayout) -> PathBuf {
    let src = dir.join("src");
    generate(
        &src,
        &SynthOptions {
            classes: 3,
            per_class: 8,
            val_per_class: 2,
            seed: 5,
            oddities,
            val_layout: layout,
            quality: 90,
            threads: 2,
        },
    )
    .unwrap();
    src
}

fn opts() -> ShardOptions {
    ShardOptions {
        // About five generated images per shard, so every split has several shards.
        shard_bytes: 200_000,
        allow_skips: true,
        threads: 2,
        quiet: true,
        ..ShardOptions::default()
    }
}

/// Every regular file under `dir`, relative path -> bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tools::files_under(dir)
        .unwrap()
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Source files of a split: key -> (path, label) from the folder layout.
fn train_files(src: &Path) -> HashMap<String, (PathBuf, u32)> {
    let mut out = HashMap::new();
    let mut classes: Vec<_> = std::fs::read_dir(src.join("train"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    classes.sort();
    for (label, wnid) in classes.iter().enumerate() {
        for e in std::fs::read_dir(src.join("train").join(wnid)).unwrap() {
            let p = e.unwrap().path();
            let key = p.file_stem().unwrap().to_string_lossy().into_owned();
            out.insert(key, (p, label as u32));
        }
    }
    out
}

#[test]
fn round_trip_returns_every_image_and_label() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(dir.path(), false, ValLayout::Kaggle);
    let dst = dir.path().join("shards");
    let summary = run(&src, &dst, &opts()).unwrap();
    assert!(summary.manifest_written);
    assert_eq!(summary.num_skipped, 0);

    let ds = Dataset::open(&dst).unwrap();
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.manifest().classes[1].wnid, "n90000001");
    assert!(ds.manifest().classes[1].name.is_some());
    let train = ds.split("train").unwrap();
    assert!(train.num_shards() > 2, "{} shards", train.num_shards());
    let files = train_files(&src);
    assert_eq!(train.len() as usize, files.len());
    let mut seen = 0;
    for i in 0..train.len() {
        let s = train.get_checked(i).unwrap();
        let (path, label) = &files[s.key];
        assert_eq!(s.jpeg, std::fs::read(path).unwrap(), "bytes of {}", s.key);
        assert_eq!(s.label, *label, "label of {}", s.key);
        seen += 1;
    }
    assert_eq!(seen, files.len());

    // Flat val with Kaggle labels: every file, labelled as in the CSV.
    let csv = std::fs::read_to_string(src.join("LOC_val_solution.csv")).unwrap();
    let wnids: Vec<String> = ds
        .manifest()
        .classes
        .iter()
        .map(|c| c.wnid.clone())
        .collect();
    let expected: HashMap<String, u32> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let (id, pred) = l.split_once(',').unwrap();
            let wnid = pred.split(' ').next().unwrap();
            (
                id.to_owned(),
                wnids.iter().position(|w| w == wnid).unwrap() as u32,
            )
        })
        .collect();
    let val = ds.split("val").unwrap();
    assert_eq!(val.len() as usize, expected.len());
    for i in 0..val.len() {
        let s = val.get(i).unwrap();
        assert_eq!(s.label, expected[s.key], "{}", s.key);
        let file = src.join("val").join(format!("{}.JPEG", s.key));
        assert_eq!(s.jpeg, std::fs::read(file).unwrap());
    }
    let e = val.get(val.len()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "sample index {} is out of range: split \"val\" has {} samples",
            val.len(),
            val.len()
        )
    );
    let e = ds.split("test").unwrap_err().to_string();
    assert_eq!(e, "no split \"test\" in the data set (it has: train, val)");
}

#[test]
fn oddities_are_converted_stored_or_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(dir.path(), true, ValLayout::Kaggle);
    let dst = dir.path().join("shards");

    // Without --allow-skips the truncated file fails the run and withholds the manifest.
    let strict = ShardOptions {
        allow_skips: false,
        ..opts()
    };
    let s = run(&src, &dst, &strict).unwrap();
    assert!(!s.manifest_written);
    assert_eq!(s.num_skipped, 1);
    assert!(!dst.join("manifest.json").exists());
    assert!(Dataset::open(&dst).is_err());

    // Accepting the skip completes the same shards and writes the manifest.
    let s = run(&src, &dst, &opts()).unwrap();
    assert!(s.manifest_written);
    assert_eq!(s.splits[0].num_shards_reused, s.splits[0].num_shards);

    let report: Report =
        serde_json::from_slice(&std::fs::read(dst.join("report.json")).unwrap()).unwrap();
    let train = &report.splits["train"];
    let what: BTreeMap<&str, &str> = train
        .converted
        .iter()
        .chain(&train.skipped)
        .map(|e| (e.key.as_str(), e.what.as_str()))
        .collect();
    assert_eq!(
        what,
        BTreeMap::from([
            (
                "n90000000_cmyk",
                "CMYK JPEG converted to RGB JPEG (quality 95)"
            ),
            ("n90000001_png", "PNG file converted to JPEG (quality 95)"),
            (
                "n90000001_truncated",
                what["n90000001_truncated"] // length varies; checked below
            ),
        ])
    );
    assert!(what["n90000001_truncated"].starts_with("truncated JPEG: no end-of-image marker"));
    assert_eq!(train.counts.grayscale, 1);
    assert_eq!(train.counts.progressive, 1);
    assert_eq!(train.counts.converted, 2);
    assert_eq!(train.counts.skipped, 1);

    let ds = Dataset::open(&dst).unwrap();
    let split = ds.split("train").unwrap();
    let files = train_files(&src);
    assert_eq!(split.len() as usize, files.len() - 1);
    let by_key: HashMap<String, u64> = (0..split.len())
        .map(|i| (split.get(i).unwrap().key.to_owned(), i))
        .collect();
    assert!(!by_key.contains_key("n90000001_truncated"));
    for key in ["n90000002_gray", "n90000000_progressive"] {
        let s = split.get(by_key[key]).unwrap();
        assert_eq!(
            s.jpeg,
            std::fs::read(&files[key].0).unwrap(),
            "{key} stored as is"
        );
    }
    for key in ["n90000000_cmyk", "n90000001_png"] {
        let s = split.get(by_key[key]).unwrap();
        let Ok(Kind::Jpeg(info)) = sniff(s.jpeg) else {
            panic!("{key} is not stored as a JPEG");
        };
        assert_eq!(info.components, 3, "{key} stored as RGB");
        assert!(!info.progressive);
        // The stored pixels are the original's within the error of a quality-95 4:2:0 JPEG.
        // The generated images carry independent noise per pixel and channel (up to +-14
        // levels), which 4:2:0's 2x2 chroma averaging removes: about 3 levels on average here,
        // so the bound is 5 (a wrong colour conversion, such as uninverted CMYK, is off by
        // tens to hundreds of levels).
        let orig = tools::convert::decode(&std::fs::read(&files[key].0).unwrap()).unwrap();
        let stored = tools::convert::decode(s.jpeg).unwrap();
        assert_eq!((orig.width, orig.height), (stored.width, stored.height));
        let mad = orig
            .data
            .iter()
            .zip(&stored.data)
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / orig.data.len() as f64;
        assert!(mad < 5.0, "{key}: mean abs difference {mad}");
        assert_eq!(s.label, files[key].1);
    }
}

#[test]
fn output_is_byte_identical_across_runs_and_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(dir.path(), true, ValLayout::Kaggle);
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    run(
        &src,
        &a,
        &ShardOptions {
            threads: 1,
            ..opts()
        },
    )
    .unwrap();
    run(
        &src,
        &b,
        &ShardOptions {
            threads: 3,
            ..opts()
        },
    )
    .unwrap();
    let (ta, tb) = (tree(&a), tree(&b));
    assert!(ta.len() > 6);
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, v) in &ta {
        assert!(v == &tb[k], "{k} differs between runs");
    }
    // A different shuffle seed stores the same samples in another order.
    let c = dir.path().join("c");
    run(
        &src,
        &c,
        &ShardOptions {
            shuffle_seed: Some(1),
            ..opts()
        },
    )
    .unwrap();
    let keys = |root: &Path| -> Vec<String> {
        let ds = Dataset::open(root).unwrap();
        let s = ds.split("train").unwrap();
        (0..s.len())
            .map(|i| s.get(i).unwrap().key.to_owned())
            .collect()
    };
    let (ka, kc) = (keys(&a), keys(&c));
    assert_ne!(ka, kc);
    let (mut sa, mut sc) = (ka.clone(), kc);
    sa.sort();
    sc.sort();
    assert_eq!(sa, sc);
    // --no-shuffle keeps class order, then file name.
    let d = dir.path().join("d");
    run(
        &src,
        &d,
        &ShardOptions {
            shuffle_seed: None,
            ..opts()
        },
    )
    .unwrap();
    let kd = keys(&d);
    let mut sorted = kd.clone();
    sorted.sort();
    assert_eq!(kd, sorted);
    // A finished set is not rebuilt, and other options are refused.
    let again = run(
        &src,
        &a,
        &ShardOptions {
            threads: 2,
            ..opts()
        },
    )
    .unwrap();
    assert!(again.already_complete);
    let e = run(
        &src,
        &a,
        &ShardOptions {
            shuffle_seed: Some(9),
            ..opts()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("already holds a finished shard set built from other input or options"),
        "{e}"
    );
}

#[test]
fn tar_members_follow_the_webdataset_convention() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(dir.path(), false, ValLayout::Folders);
    let dst = dir.path().join("shards");
    run(&src, &dst, &opts()).unwrap();
    let ds = Dataset::open(&dst).unwrap();
    let info = &ds.manifest().splits["train"].shards[1];
    let out = std::process::Command::new("tar")
        .arg("-tf")
        .arg(dst.join(&info.tar))
        .output()
        .expect("running tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let idx_bytes = std::fs::read(dst.join(&info.index)).unwrap();
    let idx = ShardIndex::parse(&idx_bytes, Path::new("i"), Path::new("t")).unwrap();
    let expected: Vec<String> = (0..idx.len())
        .flat_map(|i| [format!("{}.jpg", idx.key(i)), format!("{}.cls", idx.key(i))])
        .collect();
    assert_eq!(names, expected);
    // The .cls member holds the label in ASCII, as WebDataset readers expect.
    let out = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(dst.join(&info.tar))
        .arg(format!("{}.cls", idx.key(0)))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        idx.entry(0).label.to_string()
    );
}

#[test]
fn val_layouts_give_the_same_labels() {
    let labels = |layout| {
        let dir = tempfile::tempdir().unwrap();
        let src = synth(dir.path(), false, layout);
        let dst = dir.path().join("shards");
        run(&src, &dst, &opts()).unwrap();
        let ds = Dataset::open(&dst).unwrap();
        let val = ds.split("val").unwrap();
        (0..val.len())
            .map(|i| {
                let s = val.get(i).unwrap();
                (s.key.to_owned(), s.label)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let kaggle = labels(ValLayout::Kaggle);
    assert_eq!(kaggle.len(), 6);
    assert_eq!(kaggle, labels(ValLayout::Text));
    assert_eq!(kaggle, labels(ValLayout::Folders));
}

#[test]
fn max_side_reencodes_large_images_only() {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(dir.path(), false, ValLayout::Kaggle);
    let dst = dir.path().join("shards");
    let s = run(
        &src,
        &dst,
        &ShardOptions {
            max_side: Some(320),
            ..opts()
        },
    )
    .unwrap();
    let counts = &s.splits[0].counts;
    assert!(counts.resized > 0);
    let ds = Dataset::open(&dst).unwrap();
    let train = ds.split("train").unwrap();
    let files = train_files(&src);
    for i in 0..train.len() {
        let s = train.get(i).unwrap();
        let Ok(Kind::Jpeg(info)) = sniff(s.jpeg) else {
            panic!()
        };
        assert!(
            info.width.max(info.height) <= 320,
            "{}: {}x{}",
            s.key,
            info.width,
            info.height
        );
        let Ok(Kind::Jpeg(orig)) = sniff(&std::fs::read(&files[s.key].0).unwrap()) else {
            panic!()
        };
        if orig.width.max(orig.height) <= 320 {
            assert_eq!(s.jpeg, std::fs::read(&files[s.key].0).unwrap());
        } else {
            // Aspect ratio kept to within rounding.
            let ratio = |w: u32, h: u32| w as f64 / h as f64;
            let (a, b) = (
                ratio(orig.width, orig.height),
                ratio(info.width, info.height),
            );
            assert!((a / b - 1.0).abs() < 0.02, "{}: aspect {a} -> {b}", s.key);
        }
    }
}

/// A finished set in a temp dir, for the corruption tests.
fn finished() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = synth(dir.path(), false, ValLayout::Kaggle);
    let dst = dir.path().join("shards");
    run(&src, &dst, &opts()).unwrap();
    (dir, dst)
}

fn split_error(dst: &Path) -> String {
    match Dataset::open(dst).and_then(|ds| ds.split("train").map(|_| ())) {
        Ok(()) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_shard_is_named() {
    let (_dir, dst) = finished();
    let tar = dst.join("train/train-000001.tar");
    let len = std::fs::metadata(&tar).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&tar).unwrap();
    f.set_len(len - 3000).unwrap();
    assert_eq!(
        split_error(&dst),
        format!(
            "{}: shard is {} bytes, the manifest says {len} (truncated shard?)",
            tar.display(),
            len - 3000
        )
    );
    let report = shards::verify(&dst, 2, &|_| {}).unwrap();
    let text: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with(&format!("{}: file is", tar.display()))
                && t.ends_with("(truncated?)")),
        "{text:#?}"
    );
}

#[test]
fn corrupt_index_magic_and_version_are_named() {
    let (_dir, dst) = finished();
    let idx = dst.join("train/train-000000.idx");
    let good = std::fs::read(&idx).unwrap();
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"JUNK");
    std::fs::write(&idx, &bad).unwrap();
    assert_eq!(
        split_error(&dst),
        format!(
            "{}: not a shard index: expected magic \"SHRDIDX\\0\", found \"JUNKIDX\\0\"",
            idx.display()
        )
    );
    let mut bad = good.clone();
    bad[8] = 7;
    std::fs::write(&idx, &bad).unwrap();
    assert_eq!(
        split_error(&dst),
        format!(
            "{}: index format version 7, this reader supports version 1",
            idx.display()
        )
    );
}

#[test]
fn index_pointing_past_the_end_names_sample_and_offset() {
    let (_dir, dst) = finished();
    let idx_path = dst.join("train/train-000000.idx");
    let mut bytes = std::fs::read(&idx_path).unwrap();
    let key = {
        let idx = ShardIndex::parse(&bytes, Path::new("i"), Path::new("t")).unwrap();
        idx.key(1).to_owned()
    };
    let tar_bytes = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
    // Entry 1's offset field: 64-byte header + one 32-byte entry.
    let at = 64 + 32;
    bytes[at..at + 8].copy_from_slice(&(tar_bytes - 1100).to_le_bytes());
    std::fs::write(&idx_path, &bytes).unwrap();
    let e = split_error(&dst);
    let tar = dst.join("train/train-000000.tar");
    assert!(
        e.starts_with(&format!(
            "{}: sample 1 (key {key:?}) spans bytes {}..",
            tar.display(),
            tar_bytes - 1100
        )) && e.ends_with(&format!(
            "but the shard's data ends at {}",
            tar_bytes - 1024
        )),
        "{e}"
    );
}

#[test]
fn wrong_manifest_version_is_named() {
    let (_dir, dst) = finished();
    let path = dst.join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"format_version\": 1", "\"format_version\": 2"),
    )
    .unwrap();
    assert_eq!(
        split_error(&dst),
        format!(
            "{}: manifest format version 2, this reader supports version 1 (re-run shard-imagenet with this version)",
            path.display()
        )
    );
}

#[test]
fn verify_finds_a_flipped_byte_and_names_the_sample() {
    let (_dir, dst) = finished();
    assert!(shards::verify(&dst, 2, &|_| {})
        .unwrap()
        .problems
        .is_empty());
    let ds = Dataset::open(&dst).unwrap();
    let train = ds.split("train").unwrap();
    let s = train.get(3).unwrap();
    let (key, offset, shard) = (s.key.to_owned(), s.offset, s.shard.to_owned());
    drop(train);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[offset as usize + 100] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();

    // The reader's checked access notices, naming shard, key and offset.
    let train = ds.split("train").unwrap();
    let e = train.get_checked(3).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: sample {key:?} at byte offset {offset}: CRC-32",
            shard.display()
        )),
        "{e}"
    );
    let report = shards::verify(&dst, 2, &|_| {}).unwrap();
    let text: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(text.len(), 2, "{text:#?}");
    assert!(
        text[0].starts_with(&format!("{}: SHA-256 is", shard.display())),
        "{text:#?}"
    );
    assert!(
        text[1].contains(&format!("sample {key:?} at byte offset {offset}")),
        "{text:#?}"
    );
}
