//! `import-dataset` on tiny copies of each data set in its distributed form: labels, classes,
//! counts and pixels of the output, `shard-imagenet` on it, and clear errors for truncated files
//! and labels out of range. The Python pickles and MATLAB files are committed fixtures written by
//! tests/fixtures/make_import_fixtures.py (whose pixel and label formulas are repeated here).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IMPORT: &str = env!("CARGO_BIN_EXE_import-dataset");
const SHARD: &str = env!("CARGO_BIN_EXE_shard-imagenet");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import")
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .expect("running the binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `import-dataset` and expects success.
fn import_ok(args: &[&str]) {
    let out = run(IMPORT, &[args, &["-q"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Runs `import-dataset` and returns its one-line error (exit code 2).
fn import_err(args: &[&str]) -> String {
    let out = run(IMPORT, &[args, &["-q"]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let e = text(&out.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

/// Class folder and name of each class of a manifest, in label order.
type Classes = Vec<(String, Option<String>)>;

/// Shards `folder` with `shard-imagenet` and returns the manifest's class folder names and
/// names, and the sample count per split.
fn shard(folder: &Path, dst: &Path) -> (Classes, BTreeMap<String, u64>) {
    let out = run(SHARD, &[&s(folder), &s(dst), "-q"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("manifest.json")).unwrap()).unwrap();
    let classes = m["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["wnid"].as_str().unwrap().to_owned(),
                c["name"].as_str().map(String::from),
            )
        })
        .collect();
    let counts = m["splits"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["num_samples"].as_u64().unwrap()))
        .collect();
    (classes, counts)
}

/// Every file under `dir`, relative path -> bytes.
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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

// --- CIFAR ------------------------------------------------------------------------------------

/// Planar pixels of image `i` of split 0 (train) or 1 (test), as the fixture script makes them.
fn cifar_pixels(i: usize, split: usize) -> Vec<u8> {
    (0..3072)
        .map(|k| ((i * 37 + split * 101 + k * 13 + (k / 1024) * 7) % 256) as u8)
        .collect()
}

fn cifar10_label(i: usize, split: usize) -> u8 {
    let l = if split == 0 { i * 3 + 1 } else { i * 7 + 2 };
    (l % 10) as u8
}

fn cifar100_fine(i: usize, split: usize) -> u8 {
    ((i * 31 + 5 + split * 11) % 100) as u8
}

const CIFAR10_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The binary version of the fixtures: cifar-10-batches-bin/ in `dir` (5 train batches of 2,
/// a test batch of 3).
fn write_cifar10_bin(dir: &Path) -> PathBuf {
    let d = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&d).unwrap();
    let batch = |first: usize, n: usize, split: usize| -> Vec<u8> {
        (first..first + n)
            .flat_map(|i| {
                let mut r = vec![cifar10_label(i, split)];
                r.extend(cifar_pixels(i, split));
                r
            })
            .collect()
    };
    for b in 0..5 {
        std::fs::write(
            d.join(format!("data_batch_{}.bin", b + 1)),
            batch(2 * b, 2, 0),
        )
        .unwrap();
    }
    std::fs::write(d.join("test_batch.bin"), batch(0, 3, 1)).unwrap();
    std::fs::write(
        d.join("batches.meta.txt"),
        CIFAR10_NAMES.join("\n") + "\n\n",
    )
    .unwrap();
    d
}

fn write_cifar100_bin(dir: &Path) -> PathBuf {
    let d = dir.join("cifar-100-binary");
    std::fs::create_dir_all(&d).unwrap();
    let batch = |n: usize, split: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let f = cifar100_fine(i, split);
                let mut r = vec![f % 20, f];
                r.extend(cifar_pixels(i, split));
                r
            })
            .collect()
    };
    std::fs::write(d.join("train.bin"), batch(8, 0)).unwrap();
    std::fs::write(d.join("test.bin"), batch(3, 1)).unwrap();
    let names = |p: &str, n: usize| (0..n).map(|i| format!("{p}_{i:02}\n")).collect::<String>();
    std::fs::write(d.join("fine_label_names.txt"), names("fine", 100)).unwrap();
    std::fs::write(d.join("coarse_label_names.txt"), names("coarse", 20)).unwrap();
    d
}

/// Decodes `OUT/<split>/<class>/<i>.png`, checks it is 32 x 32 RGB and equals the planar
/// pixels interleaved (pixel (0,0) is R, G, B = bytes 0, 1024, 2048).
fn check_cifar_png(path: &Path, planar: &[u8]) {
    let img = image::open(path).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), (32, 32), "{}", path.display());
    let p00 = img.get_pixel(0, 0).0;
    assert_eq!(p00, [planar[0], planar[1024], planar[2048]]);
    let p = img.get_pixel(5, 3).0; // x 5, y 3: index 3 * 32 + 5
    assert_eq!(p, [planar[101], planar[1024 + 101], planar[2048 + 101]]);
}

#[test]
fn cifar10_binary_and_python_versions_give_the_same_folder_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let bin_src = write_cifar10_bin(dir.path());
    let (out_bin, out_py) = (dir.path().join("bin"), dir.path().join("py"));
    // The binary version found from the folder holding cifar-10-batches-bin/.
    import_ok(&["cifar10", &s(dir.path()), &s(&out_bin)]);
    import_ok(&[
        "cifar10",
        &s(&fixtures().join("cifar-10-batches-py")),
        &s(&out_py),
    ]);
    let (a, b) = (tree(&out_bin), tree(&out_py));
    assert_eq!(a, b, "the two versions differ");
    assert!(bin_src.is_dir());
    assert_eq!(a.keys().filter(|k| k.starts_with("train/")).count(), 10);
    assert_eq!(a.keys().filter(|k| k.starts_with("val/")).count(), 3);
    assert!(!out_bin.join(tools::import::PARTIAL_DIR).exists());
    for i in 0..10 {
        let l = cifar10_label(i, 0) as usize;
        let p = out_bin.join(format!("train/{l:03}_{}/{i:05}.png", CIFAR10_NAMES[l]));
        check_cifar_png(&p, &cifar_pixels(i, 0));
    }
    for i in 0..3 {
        let l = cifar10_label(i, 1) as usize;
        let p = out_bin.join(format!("val/{l:03}_{}/{i:05}.png", CIFAR10_NAMES[l]));
        check_cifar_png(&p, &cifar_pixels(i, 1));
    }
    let synsets = std::fs::read_to_string(out_bin.join("LOC_synset_mapping.txt")).unwrap();
    assert!(synsets.starts_with("000_airplane airplane\n001_automobile automobile\n"));

    let (classes, counts) = shard(&out_bin, &dir.path().join("shards"));
    let want: Vec<(String, Option<String>)> = CIFAR10_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("{i:03}_{n}"), Some(n.to_string())))
        .collect();
    assert_eq!(classes, want);
    assert_eq!(
        counts,
        BTreeMap::from([("train".into(), 10), ("val".into(), 3)])
    );

    // The test batch re-pickled by Python 3 at protocol 5 reads the same.
    let py = dir.path().join("py5");
    copy_dir(&fixtures().join("cifar-10-batches-py"), &py);
    std::fs::copy(
        fixtures().join("test_batch_protocol5"),
        py.join("test_batch"),
    )
    .unwrap();
    let out_py5 = dir.path().join("out-py5");
    // What an interrupted run left behind is removed.
    let partial = out_py5.join(tools::import::PARTIAL_DIR);
    std::fs::create_dir_all(partial.join("train/000_airplane")).unwrap();
    std::fs::write(partial.join("train/000_airplane/junk.png"), b"x").unwrap();
    import_ok(&["cifar10", &s(&py), &s(&out_py5)]);
    assert_eq!(tree(&out_py5), a);
    assert!(!partial.exists());

    // A second run into the same folder is refused.
    let e = import_err(&["cifar10", &s(dir.path()), &s(&out_bin)]);
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn cifar100_fine_and_coarse_from_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar100_bin(dir.path());
    let py = fixtures().join("cifar-100-python");
    for labels in ["fine", "coarse"] {
        let (out_bin, out_py) = (
            dir.path().join(format!("bin-{labels}")),
            dir.path().join(format!("py-{labels}")),
        );
        let bin_src = dir.path().join("cifar-100-binary");
        import_ok(&[
            "cifar100",
            &s(&bin_src),
            &s(&out_bin),
            "--cifar100-labels",
            labels,
        ]);
        import_ok(&[
            "cifar100",
            &s(&py),
            &s(&out_py),
            "--cifar100-labels",
            labels,
        ]);
        assert_eq!(tree(&out_bin), tree(&out_py), "{labels}");
        let (num, prefix) = if labels == "fine" {
            (100, "fine")
        } else {
            (20, "coarse")
        };
        for i in 0..8 {
            let f = cifar100_fine(i, 0) as usize;
            let l = if labels == "fine" { f } else { f % 20 };
            let p = out_bin.join(format!("train/{l:03}_{prefix}_{l:02}/{i:05}.png"));
            check_cifar_png(&p, &cifar_pixels(i, 0));
        }
        let (classes, counts) = shard(&out_py, &dir.path().join(format!("shards-{labels}")));
        assert_eq!(classes.len(), num);
        assert_eq!(
            classes[7],
            (format!("007_{prefix}_07"), Some(format!("{prefix}_07")))
        );
        assert_eq!(
            counts,
            BTreeMap::from([("train".into(), 8), ("val".into(), 3)])
        );
    }
}

#[test]
fn cifar_truncated_files_and_bad_labels_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bin = write_cifar10_bin(&dir.path().join("a"));
    let out = dir.path().join("out");
    let batch = bin.join("data_batch_3.bin");
    let bytes = std::fs::read(&batch).unwrap();
    std::fs::write(&batch, &bytes[..bytes.len() - 10]).unwrap();
    let e = import_err(&["cifar10", &s(&bin), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: 6136 bytes, not a whole number of 3073-byte records",
            batch.display()
        )),
        "{e}"
    );
    let mut bad = bytes.clone();
    bad[3073] = 10; // the second record's label
    std::fs::write(&batch, &bad).unwrap();
    let e = import_err(&["cifar10", &s(&bin), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: record 1: label 10, expected 0 to 9",
            batch.display()
        )),
        "{e}"
    );
    assert!(!out.join("train").exists() && !out.join("val").exists());

    // CIFAR-100 binary: a fine label of 100.
    let bin100 = write_cifar100_bin(&dir.path().join("b"));
    let train = bin100.join("train.bin");
    let mut bytes = std::fs::read(&train).unwrap();
    bytes[3074 * 2 + 1] = 100;
    std::fs::write(&train, &bytes).unwrap();
    let e = import_err(&["cifar100", &s(&bin100), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: record 2: fine label 100, expected 0 to 99",
            train.display()
        )),
        "{e}"
    );

    // Python version: a truncated pickle, and a label out of range.
    let py = dir.path().join("py");
    copy_dir(&fixtures().join("cifar-10-batches-py"), &py);
    let batch = py.join("data_batch_2");
    let good = std::fs::read(&batch).unwrap();
    std::fs::write(&batch, &good[..4000]).unwrap();
    let e = import_err(&["cifar10", &s(&py), &s(&out)]);
    assert!(
        e.contains(&format!("{}: pickle byte ", batch.display())),
        "{e}"
    );
    assert!(e.contains("truncated?"), "{e}");
    // The label list is `](K<l>K<l>e`: replace the first label (BININT1) with 10.
    let at = good.windows(7).position(|w| w == b"labelsq").unwrap();
    let mut bad = good.clone();
    let k = at + good[at..].iter().position(|&b| b == b'K').unwrap();
    bad[k + 1] = 10;
    std::fs::write(&batch, &bad).unwrap();
    let e = import_err(&["cifar10", &s(&py), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: b'labels'[0] is 10, expected 0 to 9",
            batch.display()
        )),
        "{e}"
    );
    // A claimed length beyond the file: the pixel BINSTRING's length set to 2^31 - 1.
    let t = good.iter().position(|&b| b == b'T').unwrap();
    let mut bad = good.clone();
    bad[t + 1..t + 5].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    std::fs::write(&batch, &bad).unwrap();
    let e = import_err(&["cifar10", &s(&py), &s(&out)]);
    assert!(e.contains("claims 2147483647 bytes"), "{e}");
    std::fs::write(&batch, &good).unwrap();
    std::fs::remove_file(py.join("batches.meta")).unwrap();
    let e = import_err(&["cifar10", &s(&py), &s(&out)]);
    assert!(e.contains(&s(&py.join("batches.meta"))), "{e}");
    // Not a CIFAR folder at all.
    let e = import_err(&["cifar100", &s(&py), &s(&out)]);
    assert!(e.contains("found neither train.bin nor train"), "{e}");
}

// --- Files copied as they are (iNaturalist, Flowers-102, Stanford Cars) -------------------------

/// A small JPEG whose pixels depend on `seed`, at `path` (parents created).
fn write_jpeg(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(8, 6, |x, y| {
        image::Rgb([seed, (x * 30) as u8, (y * 40) as u8 ^ seed])
    });
    img.save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

/// `OUT/<split>/<class>/<file>` -> bytes, for the files of one split.
fn files_of(out: &Path, split: &str) -> BTreeMap<String, Vec<u8>> {
    tree(&out.join(split))
}

fn inat_json(images: &[(i64, &str)], annos: &[(i64, i64)], categories: &[(i64, &str)]) -> String {
    serde_json::json!({
        "info": {"year": 2019},
        "images": images.iter().map(|(id, f)| serde_json::json!({
            "id": id, "file_name": f, "width": 8, "height": 6, "license": 0})).collect::<Vec<_>>(),
        "annotations": annos.iter().enumerate().map(|(i, (im, c))| serde_json::json!({
            "id": i, "image_id": im, "category_id": c})).collect::<Vec<_>>(),
        "categories": categories.iter().map(|(id, n)| serde_json::json!({
            "id": id, "name": n, "kingdom": "Plantae", "supercategory": "Plants"})).collect::<Vec<_>>(),
    })
    .to_string()
}

/// iNaturalist-2019-like SRC: categories 400, 5, 17 (labels 2, 0, 1 by id), 4 train and 2
/// val images.
fn write_inat(src: &Path) {
    let cats = [
        (400, "Abies concolor"),
        (5, "Turdus migratorius"),
        (17, "Danaus plexippus"),
    ];
    let train = [
        (10, "train_val2019/Plants/400/aa01.jpg"),
        (11, "train_val2019/Birds/5/bb02.jpg"),
        (12, "train_val2019/Birds/5/bb03.jpg"),
        (13, "train_val2019/Insects/17/cc04.jpg"),
    ];
    let val = [
        (20, "train_val2019/Plants/400/dd05.jpg"),
        (21, "train_val2019/Insects/17/ee06.jpg"),
    ];
    for (i, (_, f)) in train.iter().chain(&val).enumerate() {
        write_jpeg(&src.join(f), i as u8 * 20);
    }
    std::fs::write(
        src.join("train2019.json"),
        inat_json(&train, &[(13, 17), (10, 400), (11, 5), (12, 5)], &cats),
    )
    .unwrap();
    std::fs::write(
        src.join("val2019.json"),
        inat_json(&val, &[(20, 400), (21, 17)], &cats),
    )
    .unwrap();
}

#[test]
fn inat2019_images_in_category_id_order_and_sharded() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("inat");
    write_inat(&src);
    let out = dir.path().join("out");
    import_ok(&["inat2019", &s(&src), &s(&out)]);
    let train = files_of(&out, "train");
    let names: Vec<&str> = train.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "000_Turdus_migratorius/bb02.jpg",
            "000_Turdus_migratorius/bb03.jpg",
            "001_Danaus_plexippus/cc04.jpg",
            "002_Abies_concolor/aa01.jpg"
        ]
    );
    // The same bytes as the source (hard-linked or copied).
    assert_eq!(
        train["002_Abies_concolor/aa01.jpg"],
        std::fs::read(src.join("train_val2019/Plants/400/aa01.jpg")).unwrap()
    );
    let val: Vec<String> = files_of(&out, "val").into_keys().collect();
    assert_eq!(
        val,
        [
            "001_Danaus_plexippus/ee06.jpg",
            "002_Abies_concolor/dd05.jpg"
        ]
    );
    let (classes, counts) = shard(&out, &dir.path().join("shards"));
    assert_eq!(
        classes,
        [
            (
                "000_Turdus_migratorius".to_string(),
                Some("Turdus migratorius".to_string())
            ),
            (
                "001_Danaus_plexippus".into(),
                Some("Danaus plexippus".into())
            ),
            ("002_Abies_concolor".into(), Some("Abies concolor".into())),
        ]
    );
    assert_eq!(
        counts,
        BTreeMap::from([("train".into(), 4), ("val".into(), 2)])
    );
}

#[test]
fn inat2019_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("inat");
    write_inat(&src);
    let out = dir.path().join("out");
    let train_json = src.join("train2019.json");
    let good = std::fs::read(&train_json).unwrap();
    std::fs::write(&train_json, &good[..good.len() / 2]).unwrap();
    let e = import_err(&["inat2019", &s(&src), &s(&out)]);
    assert!(
        e.contains(&format!("{}: EOF while parsing", train_json.display())),
        "{e}"
    );
    // A category beyond the list.
    let text = String::from_utf8(good.clone()).unwrap();
    std::fs::write(
        &train_json,
        text.replace("\"category_id\":17", "\"category_id\":18"),
    )
    .unwrap();
    let e = import_err(&["inat2019", &s(&src), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: annotations[0] (image id 13) has category_id 18, which is not among the 3 categories",
            train_json.display()
        )),
        "{e}"
    );
    // An image without an annotation.
    std::fs::write(
        &train_json,
        text.replace("\"image_id\":13", "\"image_id\":12"),
    )
    .unwrap();
    let e = import_err(&["inat2019", &s(&src), &s(&out)]);
    assert!(
        e.contains("image id 12 has more than one annotation"),
        "{e}"
    );
    // A missing image.
    std::fs::write(&train_json, &good).unwrap();
    let gone = src.join("train_val2019/Insects/17/ee06.jpg");
    std::fs::remove_file(&gone).unwrap();
    let e = import_err(&["inat2019", &s(&src), &s(&out)]);
    assert!(
        e.contains(&format!("{}: missing (image id 21 of", gone.display())),
        "{e}"
    );
    assert!(!out.join("train").exists());
}

/// A MAT-file (level 5, uncompressed) with one double row vector `name`.
fn mat_with_doubles(name: &str, values: &[f64]) -> Vec<u8> {
    let mut v = vec![b' '; 116];
    v[..20].copy_from_slice(b"MATLAB 5.0 MAT-file,");
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&0x0100u16.to_le_bytes());
    v.extend_from_slice(b"IM");
    let pad = |b: &mut Vec<u8>| b.resize(b.len().div_ceil(8) * 8, 0);
    let mut m = Vec::new();
    let tag = |b: &mut Vec<u8>, t: u32, n: usize| {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&(n as u32).to_le_bytes());
    };
    tag(&mut m, 6, 8);
    m.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]); // mxDOUBLE_CLASS
    tag(&mut m, 5, 8);
    m.extend_from_slice(&1i32.to_le_bytes());
    m.extend_from_slice(&(values.len() as i32).to_le_bytes());
    tag(&mut m, 1, name.len());
    m.extend_from_slice(name.as_bytes());
    pad(&mut m);
    tag(&mut m, 9, values.len() * 8);
    for x in values {
        m.extend_from_slice(&x.to_le_bytes());
    }
    tag(&mut v, 14, m.len());
    v.extend(m);
    v
}

/// Flowers-102 SRC from the fixtures: 12 images.
fn write_flowers(src: &Path) {
    copy_dir(&fixtures().join("flowers102"), src);
    for n in 1..=12 {
        write_jpeg(&src.join(format!("jpg/image_{n:05}.jpg")), n as u8 * 10);
    }
}

#[test]
fn flowers102_keeps_its_three_splits_or_folds_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("flowers");
    write_flowers(&src);
    let out = dir.path().join("out");
    import_ok(&["flowers102", &s(&src), &s(&out)]);
    // labels 1 1 2 102 5 2 1 102 5 5 2 1; trnid 1 3 4 9, valid 2 5 8 11, tstid 6 7 10 12.
    let keys = |split: &str| files_of(&out, split).into_keys().collect::<Vec<_>>();
    assert_eq!(
        keys("train"),
        [
            "000/image_00001.jpg",
            "001/image_00003.jpg",
            "004/image_00009.jpg",
            "101/image_00004.jpg"
        ]
    );
    assert_eq!(
        keys("val"),
        [
            "000/image_00002.jpg",
            "001/image_00011.jpg",
            "004/image_00005.jpg",
            "101/image_00008.jpg"
        ]
    );
    assert_eq!(
        keys("test"),
        [
            "000/image_00007.jpg",
            "000/image_00012.jpg",
            "001/image_00006.jpg",
            "004/image_00010.jpg"
        ]
    );
    assert!(!out.join("LOC_synset_mapping.txt").exists());
    let (classes, counts) = shard(&out, &dir.path().join("shards"));
    assert_eq!(classes.len(), 102);
    assert_eq!(classes[101], ("101".to_string(), None));
    assert_eq!(
        counts,
        BTreeMap::from([("train".into(), 4), ("val".into(), 4)])
    );

    let out2 = dir.path().join("out2");
    import_ok(&["flowers102", &s(&src), &s(&out2), "--split-for-test", "val"]);
    assert_eq!(files_of(&out2, "train").len(), 8);
    assert_eq!(files_of(&out2, "val"), files_of(&out, "test"));
    assert!(!out2.join("test").exists());
}

#[test]
fn flowers102_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("flowers");
    write_flowers(&src);
    let out = dir.path().join("out");
    let labels = src.join("imagelabels.mat");
    let good = std::fs::read(&labels).unwrap();
    std::fs::write(&labels, &good[..good.len() - 20]).unwrap();
    let e = import_err(&["flowers102", &s(&src), &s(&out)]);
    assert!(
        e.starts_with(&format!("import-dataset: error: {}: ", labels.display())),
        "{e}"
    );
    let mut values = vec![1.0; 12];
    values[6] = 103.0;
    std::fs::write(&labels, mat_with_doubles("labels", &values)).unwrap();
    let e = import_err(&["flowers102", &s(&src), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: labels(7) is 103, expected an integer from 1 to 102",
            labels.display()
        )),
        "{e}"
    );
    // The hand-written file with good labels is read like scipy's compressed one.
    values[6] = 2.0;
    std::fs::write(&labels, mat_with_doubles("labels", &values)).unwrap();
    import_ok(&["flowers102", &s(&src), &s(&out)]);
    // A truncated hand-written file: the claimed length is beyond the end.
    let bytes = mat_with_doubles("labels", &values);
    std::fs::write(&labels, &bytes[..bytes.len() - 8]).unwrap();
    let e = import_err(&["flowers102", &s(&src), &s(&dir.path().join("o2"))]);
    assert!(e.contains("only") && e.contains("truncated?"), "{e}");
    std::fs::write(&labels, &good).unwrap();
    let gone = src.join("jpg/image_00010.jpg");
    std::fs::remove_file(&gone).unwrap();
    let e = import_err(&["flowers102", &s(&src), &s(&dir.path().join("o3"))]);
    assert!(
        e.contains(&format!("{}: missing (image 10 of", gone.display())),
        "{e}"
    );
}

fn write_cars(src: &Path) {
    copy_dir(
        &fixtures().join("stanford-cars/devkit"),
        &src.join("devkit"),
    );
    for n in 1..=4 {
        write_jpeg(&src.join(format!("cars_train/{n:05}.jpg")), n as u8 * 10);
    }
    for n in 1..=3 {
        write_jpeg(&src.join(format!("cars_test/{n:05}.jpg")), n as u8 * 10 + 5);
    }
}

const CAR_CLASSES: [&str; 3] = [
    "000_AM_General_Hummer_SUV_2000",
    "001_Acura_RL_Sedan_2012",
    "002_smart_fortwo_Convertible_2012",
];

#[test]
fn stanford_cars_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("cars");
    write_cars(&src);
    let out = dir.path().join("out");
    import_ok(&["stanford-cars", &s(&src), &s(&out)]);
    // train classes 1 3 3 2, test 2 1 3.
    let keys = |out: &Path, split: &str| files_of(out, split).into_keys().collect::<Vec<_>>();
    let [a, b, c] = CAR_CLASSES;
    assert_eq!(
        keys(&out, "train"),
        [
            format!("{a}/00001.jpg"),
            format!("{b}/00004.jpg"),
            format!("{c}/00002.jpg"),
            format!("{c}/00003.jpg")
        ]
    );
    assert_eq!(
        keys(&out, "val"),
        [
            format!("{a}/00002.jpg"),
            format!("{b}/00001.jpg"),
            format!("{c}/00003.jpg")
        ]
    );
    let (classes, counts) = shard(&out, &dir.path().join("shards"));
    assert_eq!(
        classes[0],
        (
            a.to_string(),
            Some("AM General Hummer SUV 2000".to_string())
        )
    );
    assert_eq!(
        classes[2].1.as_deref(),
        Some("smart fortwo Convertible 2012")
    );
    assert_eq!(
        counts,
        BTreeMap::from([("train".into(), 4), ("val".into(), 3)])
    );

    // car_ims/ + cars_annos.mat: classes 3 1 2 3 1, test flags 0 0 1 1 0.
    let src = dir.path().join("cars-all");
    copy_dir(&fixtures().join("stanford-cars-all"), &src);
    for n in 1..=5 {
        write_jpeg(&src.join(format!("car_ims/{n:06}.jpg")), n as u8);
    }
    let out = dir.path().join("out-all");
    import_ok(&["stanford-cars", &s(&src), &s(&out)]);
    assert_eq!(
        keys(&out, "train"),
        [
            format!("{a}/000002.jpg"),
            format!("{a}/000005.jpg"),
            format!("{c}/000001.jpg")
        ]
    );
    assert_eq!(
        keys(&out, "val"),
        [format!("{b}/000003.jpg"), format!("{c}/000004.jpg")]
    );
}

#[test]
fn stanford_cars_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("cars");
    write_cars(&src);
    let out = dir.path().join("out");
    let annos = src.join("devkit/cars_train_annos.mat");
    std::fs::copy(
        fixtures().join("stanford-cars/bad/cars_train_annos.mat"),
        &annos,
    )
    .unwrap();
    let e = import_err(&["stanford-cars", &s(&src), &s(&out)]);
    assert!(
        e.contains(&format!(
            "{}: annotations(2).class(1) is 4, expected an integer from 1 to 3",
            annos.display()
        )),
        "{e}"
    );
    let good = std::fs::read(fixtures().join("stanford-cars/devkit/cars_train_annos.mat")).unwrap();
    std::fs::write(&annos, &good[..good.len() - 100]).unwrap();
    let e = import_err(&["stanford-cars", &s(&src), &s(&out)]);
    assert!(e.contains(&format!("{}: byte ", annos.display())), "{e}");
    assert!(e.contains("truncated?"), "{e}");
    // The compressed test file cut short.
    std::fs::write(&annos, &good).unwrap();
    let test = src.join("devkit/cars_test_annos_withlabels.mat");
    let bytes = std::fs::read(&test).unwrap();
    std::fs::write(&test, &bytes[..bytes.len() - 30]).unwrap();
    let e = import_err(&["stanford-cars", &s(&src), &s(&out)]);
    assert!(e.contains(&format!("{}: ", test.display())), "{e}");
    assert!(!out.join("train").exists());
}

// --- Malformed input ---------------------------------------------------------------------------

/// Mutated and truncated copies of the fixtures: the pickle and MAT readers return errors or
/// values, never panic (a small in-test fuzzer; deterministic).
#[test]
fn mutated_pickles_and_mat_files_never_panic() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let files = [
        "cifar-10-batches-py/data_batch_1",
        "cifar-10-batches-py/batches.meta",
        "cifar-100-python/test",
        "cifar-100-python/meta",
        "flowers102/setid.mat",
        "stanford-cars/devkit/cars_train_annos.mat",
        "stanford-cars/devkit/cars_test_annos_withlabels.mat",
        "stanford-cars-all/cars_annos.mat",
    ];
    for f in files {
        let good = std::fs::read(fixtures().join(f)).unwrap();
        let is_mat = f.ends_with(".mat");
        let check = |bytes: &[u8]| {
            if is_mat {
                let _ = tools::import::mat::read_mat(bytes);
            } else {
                let _ = tools::import::pickle::load(bytes);
            }
        };
        for round in 0..600 {
            let mut b = good.clone();
            for _ in 0..1 + round % 4 {
                let at = next() as usize % b.len();
                b[at] = match next() % 4 {
                    0 => 0xff,
                    1 => 0,
                    2 => b[at] ^ (1 << (next() % 8)),
                    _ => next() as u8,
                };
            }
            if round % 3 == 0 {
                b.truncate(next() as usize % b.len());
            }
            check(&b);
        }
    }
}

// --- scripts/transfer.sh ------------------------------------------------------------------------

/// `scripts/transfer.sh` end to end on the CIFAR-10 binary fixture with the binaries of this
/// build (`BIN`): it recognises the data set in the directory above the batches, imports, shards,
/// fine-tunes from a resnet18 of 3 classes (the classifier replaced for 10) with train arguments
/// passed through, and plots; a directory with no known data set is an error listing what it
/// looks for.
#[test]
fn transfer_script_runs_the_whole_path() {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("download");
    write_cifar10_bin(&parent);
    let recipe = trainer::recipe::Recipe::ft();
    let net = trainer::model::ResNetConfig::by_name("resnet18").unwrap();
    let (varmap, _) = trainer::train::build_model(&recipe, Some(&net), 3, &Device::Cpu).unwrap();
    let weights = dir.path().join("pre.safetensors");
    varmap.save(&weights).unwrap();
    assert!(varmap.all_vars().iter().all(|v| v.dtype() == DType::F32));

    let bin = Path::new(env!("CARGO_BIN_EXE_train")).parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/transfer.sh");
    let out = dir.path().join("out");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&parent)
        .args([
            "--model",
            "resnet18",
            "--size",
            "32",
            "--set",
            "data.test_size_px=32",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--micro-batch",
            "2",
            "--set",
            "schedule.warmup_epochs=0",
            "--workers",
            "1",
            "--no-bar",
        ])
        .env("WEIGHTS", &weights)
        .env("OUT", &out)
        .env("BIN", bin)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status.stderr));
    let err = text(&status.stderr);
    assert!(err.contains("transfer.sh: cifar10 in"), "{err}");
    let run_dir = out.join("run");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("init-from.json")).unwrap()).unwrap();
    assert_eq!(record["num_classes"], 10);
    assert_eq!(
        record["replaced"],
        serde_json::json!(["fc.weight", "fc.bias"])
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"top1\""), "{metrics}");
    let recipe = std::fs::read_to_string(run_dir.join("recipe.toml")).unwrap();
    assert!(recipe.contains("name = \"sgd\""), "the ft preset: {recipe}");
    assert!(run_dir.join("plot.png").is_file());
    assert_eq!(
        shard(&out.join("folder"), &dir.path().join("check"))
            .0
            .len(),
        10
    );

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("a")).unwrap();
    std::fs::create_dir_all(empty.join("b")).unwrap();
    let bad = Command::new("bash")
        .arg(&script)
        .arg(&empty)
        .env("WEIGHTS", &weights)
        .env("BIN", bin)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = text(&bad.stderr);
    assert!(
        err.contains("no known data set") && err.contains("CIFAR-100"),
        "{err}"
    );
}
