//! CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) in either distributed form, found in SRC itself or
//! in the folder that the archive extracts to:
//!
//! ```text
//! cifar-10-batches-bin/   data_batch_1.bin .. data_batch_5.bin, test_batch.bin: records of
//!                         1 label byte + 3072 pixel bytes (R plane, G, B; 32 x 32, rows top to
//!                         bottom); batches.meta.txt: the 10 class names, one a line
//! cifar-10-batches-py/    data_batch_1 .. data_batch_5, test_batch: pickled dicts with
//!                         b'data' (numpy uint8 array N x 3072, as above) and b'labels';
//!                         batches.meta: b'label_names'
//! cifar-100-binary/       train.bin, test.bin: records of 2 label bytes (coarse, fine) + 3072;
//!                         fine_label_names.txt, coarse_label_names.txt
//! cifar-100-python/       train, test: b'data', b'fine_labels', b'coarse_labels';
//!                         meta: b'fine_label_names', b'coarse_label_names'
//! ```
//!
//! The training batches become `train/`, the test batch `val/`; image `i` of a split (counting
//! across the batches in order) is written as `<i, 5 digits>.png`, so both forms give the same
//! files. Class folders are `000_airplane` .. `009_truck` (CIFAR-100: `000_apple` ..
//! `099_worm`, or the 20 superclasses with `--cifar100-labels coarse`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use super::pickle::{self, Value};
use super::{
    class_dirs, read_file, Cifar100Labels, DatasetKind, ImportOptions, ImportSummary, Output,
};

/// Pixel bytes of one image: 32 x 32 x 3, planar.
pub const IMAGE_BYTES: usize = 3072;
/// Side of an image in pixels.
pub const SIDE_PX: u32 = 32;

/// The two distributed forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarForm {
    /// `*.bin` records.
    Binary,
    /// Pickled dicts.
    Python,
}

/// One split as read: planar pixels and labels of the chosen kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CifarSplit {
    /// `N * 3072` bytes.
    pub pixels: Vec<u8>,
    /// `N` labels.
    pub labels: Vec<u8>,
}

struct Layout {
    form: CifarForm,
    dir: PathBuf,
    train: Vec<&'static str>,
    test: &'static str,
}

fn find_layout(kind: DatasetKind, src: &Path) -> Result<Layout> {
    let (sub_bin, sub_py, train_bin, train_py): (_, _, Vec<&str>, Vec<&str>) = match kind {
        DatasetKind::Cifar10 => (
            "cifar-10-batches-bin",
            "cifar-10-batches-py",
            vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            vec![
                "data_batch_1",
                "data_batch_2",
                "data_batch_3",
                "data_batch_4",
                "data_batch_5",
            ],
        ),
        _ => (
            "cifar-100-binary",
            "cifar-100-python",
            vec!["train.bin"],
            vec!["train"],
        ),
    };
    let (test_bin, test_py) = match kind {
        DatasetKind::Cifar10 => ("test_batch.bin", "test_batch"),
        _ => ("test.bin", "test"),
    };
    for dir in [src.to_owned(), src.join(sub_bin), src.join(sub_py)] {
        if dir.join(train_bin[0]).is_file() {
            return Ok(Layout {
                form: CifarForm::Binary,
                dir,
                train: train_bin,
                test: test_bin,
            });
        }
        if dir.join(train_py[0]).is_file() {
            return Ok(Layout {
                form: CifarForm::Python,
                dir,
                train: train_py,
                test: test_py,
            });
        }
    }
    bail!(
        "{}: found neither {} nor {} (in it, or in {sub_bin}/ or {sub_py}/): expected an extracted {} archive",
        src.display(),
        train_bin[0],
        train_py[0],
        if kind == DatasetKind::Cifar10 { "CIFAR-10" } else { "CIFAR-100" }
    )
}

/// Label bytes per record of the binary form, and which one is used.
fn label_spec(kind: DatasetKind, labels: Cifar100Labels) -> (usize, usize, usize) {
    // (label bytes per record, offset of the used label, number of classes)
    match (kind, labels) {
        (DatasetKind::Cifar10, _) => (1, 0, 10),
        (_, Cifar100Labels::Coarse) => (2, 0, 20),
        (_, Cifar100Labels::Fine) => (2, 1, 100),
    }
}

/// Reads one `.bin` batch: records of `label_bytes` + 3072 bytes. Every label byte is checked
/// (CIFAR-100: coarse below 20, fine below 100), the one at `used` is returned.
pub fn read_binary_batch(
    path: &Path,
    kind: DatasetKind,
    labels: Cifar100Labels,
) -> Result<CifarSplit> {
    let (label_bytes, used, _) = label_spec(kind, labels);
    let limits: &[usize] = if label_bytes == 1 { &[10] } else { &[20, 100] };
    let names: &[&str] = if label_bytes == 1 {
        &["label"]
    } else {
        &["coarse label", "fine label"]
    };
    let bytes = read_file(path)?;
    let record = label_bytes + IMAGE_BYTES;
    if bytes.is_empty() || bytes.len() % record != 0 {
        bail!(
            "{}: {} bytes, not a whole number of {record}-byte records ({label_bytes} label byte{} + {IMAGE_BYTES} pixel bytes): truncated?",
            path.display(),
            bytes.len(),
            if label_bytes == 1 { "" } else { "s" }
        );
    }
    let n = bytes.len() / record;
    let mut out = CifarSplit {
        pixels: Vec::with_capacity(n * IMAGE_BYTES),
        labels: Vec::with_capacity(n),
    };
    for (i, r) in bytes.chunks_exact(record).enumerate() {
        for (j, &limit) in limits.iter().enumerate() {
            if r[j] as usize >= limit {
                bail!(
                    "{}: record {i}: {} {}, expected 0 to {}",
                    path.display(),
                    names[j],
                    r[j],
                    limit - 1
                );
            }
        }
        out.labels.push(r[used]);
        out.pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok(out)
}

fn load_pickle(path: &Path) -> Result<Value> {
    let bytes = read_file(path)?;
    let v = pickle::load(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if !matches!(v, Value::Dict(_)) {
        bail!(
            "{}: holds {}, expected a pickled dict",
            path.display(),
            v.kind()
        );
    }
    Ok(v)
}

fn int_list(path: &Path, v: &Value, key: &str, limit: usize) -> Result<Vec<u8>> {
    let items = match v.get(key) {
        Some(Value::Array(Some(a))) if a.shape.len() == 1 && a.dtype.ends_with("u1") => {
            a.data.iter().map(|&b| Value::Int(b as i64)).collect()
        }
        Some(l) => l.items().ok_or_else(|| {
            anyhow!(
                "{}: b'{key}' is {}, expected a list of ints",
                path.display(),
                l.kind()
            )
        })?,
        None => bail!("{}: no b'{key}' in the pickled dict", path.display()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::Int(l) if (0..limit as i64).contains(l) => Ok(*l as u8),
            Value::Int(l) => bail!(
                "{}: b'{key}'[{i}] is {l}, expected 0 to {}",
                path.display(),
                limit - 1
            ),
            other => bail!(
                "{}: b'{key}'[{i}] is {}, expected an int",
                path.display(),
                other.kind()
            ),
        })
        .collect()
}

/// Reads one pickled batch (Python form).
pub fn read_python_batch(
    path: &Path,
    kind: DatasetKind,
    labels: Cifar100Labels,
) -> Result<CifarSplit> {
    let v = load_pickle(path)?;
    let data = match v.get("data") {
        Some(Value::Array(Some(a))) => a,
        Some(other) => bail!(
            "{}: b'data' is {}, expected a numpy array",
            path.display(),
            other.kind()
        ),
        None => bail!("{}: no b'data' in the pickled dict", path.display()),
    };
    let n = data.shape.first().copied().unwrap_or(0);
    if data.shape.len() != 2
        || data.shape[1] != IMAGE_BYTES
        || !data.dtype.ends_with("u1")
        || data.fortran_order
    {
        bail!(
            "{}: b'data' is an array {:?} of {}{}, expected N x {IMAGE_BYTES} of u1 in C order",
            path.display(),
            data.shape,
            data.dtype,
            if data.fortran_order {
                " in Fortran order"
            } else {
                ""
            }
        );
    }
    if n.checked_mul(IMAGE_BYTES) != Some(data.data.len()) {
        bail!(
            "{}: b'data' is {n} x {IMAGE_BYTES} but holds {} bytes",
            path.display(),
            data.data.len()
        );
    }
    let out_labels = match (kind, labels) {
        (DatasetKind::Cifar10, _) => int_list(path, &v, "labels", 10)?,
        (_, which) => {
            let coarse = int_list(path, &v, "coarse_labels", 20)?;
            let fine = int_list(path, &v, "fine_labels", 100)?;
            if coarse.len() != fine.len() {
                bail!(
                    "{}: {} coarse labels but {} fine labels",
                    path.display(),
                    coarse.len(),
                    fine.len()
                );
            }
            if which == Cifar100Labels::Coarse {
                coarse
            } else {
                fine
            }
        }
    };
    if out_labels.len() != n {
        bail!(
            "{}: {n} images but {} labels: expected one label per image",
            path.display(),
            out_labels.len()
        );
    }
    Ok(CifarSplit {
        pixels: data.data.to_vec(),
        labels: out_labels,
    })
}

fn read_names(layout: &Layout, kind: DatasetKind, labels: Cifar100Labels) -> Result<Vec<String>> {
    let (_, _, num) = label_spec(kind, labels);
    let (file, key) = match (layout.form, kind, labels) {
        (CifarForm::Binary, DatasetKind::Cifar10, _) => ("batches.meta.txt", ""),
        (CifarForm::Binary, _, Cifar100Labels::Fine) => ("fine_label_names.txt", ""),
        (CifarForm::Binary, _, Cifar100Labels::Coarse) => ("coarse_label_names.txt", ""),
        (CifarForm::Python, DatasetKind::Cifar10, _) => ("batches.meta", "label_names"),
        (CifarForm::Python, _, Cifar100Labels::Fine) => ("meta", "fine_label_names"),
        (CifarForm::Python, _, Cifar100Labels::Coarse) => ("meta", "coarse_label_names"),
    };
    let path = layout.dir.join(file);
    let names: Vec<String> = match layout.form {
        CifarForm::Binary => {
            let bytes = read_file(&path)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow!("{}: not UTF-8 text, expected class names", path.display()))?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        }
        CifarForm::Python => {
            let v = load_pickle(&path)?;
            let list = v
                .get(key)
                .ok_or_else(|| anyhow!("{}: no b'{key}' in the pickled dict", path.display()))?;
            let items = list.items().ok_or_else(|| {
                anyhow!(
                    "{}: b'{key}' is {}, expected a list",
                    path.display(),
                    list.kind()
                )
            })?;
            items
                .iter()
                .map(|x| {
                    x.as_text().ok_or_else(|| {
                        anyhow!(
                            "{}: b'{key}' holds {}, expected strings",
                            path.display(),
                            x.kind()
                        )
                    })
                })
                .collect::<Result<_>>()?
        }
    };
    if names.len() != num {
        bail!(
            "{}: {} class names, expected {num}",
            path.display(),
            names.len()
        );
    }
    Ok(names)
}

/// Imports CIFAR-10 or CIFAR-100 (see the module docs).
pub fn import(
    kind: DatasetKind,
    src: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportSummary> {
    let start = Instant::now();
    let layout = find_layout(kind, src)?;
    let labels = opts.cifar100_labels;
    let names = read_names(&layout, kind, labels)?;
    let read = |file: &str| -> Result<CifarSplit> {
        let path = layout.dir.join(file);
        if !path.is_file() {
            bail!(
                "{}: missing (expected with {})",
                path.display(),
                layout.dir.join(layout.train[0]).display()
            );
        }
        match layout.form {
            CifarForm::Binary => read_binary_batch(&path, kind, labels),
            CifarForm::Python => read_python_batch(&path, kind, labels),
        }
    };
    let mut train = CifarSplit {
        pixels: Vec::new(),
        labels: Vec::new(),
    };
    for file in &layout.train {
        let b = read(file)?;
        train.pixels.extend_from_slice(&b.pixels);
        train.labels.extend_from_slice(&b.labels);
    }
    let val = read(layout.test)?;
    let notes = vec![format!(
        "{} form in {}{}",
        match layout.form {
            CifarForm::Binary => "binary",
            CifarForm::Python => "Python",
        },
        layout.dir.display(),
        match (kind, labels) {
            (DatasetKind::Cifar10, _) => "",
            (_, Cifar100Labels::Fine) => ", fine labels",
            (_, Cifar100Labels::Coarse) => ", coarse labels",
        }
    )];
    let classes = class_dirs(&names.into_iter().map(Some).collect::<Vec<_>>());
    let mut output = Output::create(out, &["train", "val"], classes, opts.quiet)?;
    let mut rgb = vec![0u8; IMAGE_BYTES];
    for (s, split) in [&train, &val].into_iter().enumerate() {
        output.begin_split(s, split.labels.len());
        for (i, (planar, &label)) in split
            .pixels
            .chunks_exact(IMAGE_BYTES)
            .zip(&split.labels)
            .enumerate()
        {
            planar_to_rgb(planar, &mut rgb);
            output.write_png(
                s,
                label as usize,
                &format!("{i:05}"),
                SIDE_PX,
                SIDE_PX,
                &rgb,
            )?;
        }
    }
    output.finish(kind, notes, start)
}

/// CIFAR's planar layout (1024 R, 1024 G, 1024 B) to interleaved RGB.
pub fn planar_to_rgb(planar: &[u8], rgb: &mut [u8]) {
    let n = planar.len() / 3;
    for p in 0..n {
        rgb[3 * p] = planar[p];
        rgb[3 * p + 1] = planar[n + p];
        rgb[3 * p + 2] = planar[2 * n + p];
    }
}
