//! Stanford Cars (Krause et al., 2013) in either distributed form:
//!
//! ```text
//! SRC/cars_train/00001.jpg ..            the split archives (cars_train.tgz, cars_test.tgz)
//! SRC/cars_test/00001.jpg ..
//! SRC/devkit/cars_meta.mat               class_names: 1 x 196 cell of char
//! SRC/devkit/cars_train_annos.mat        annotations: struct array with fname, class (1-based),
//!                                        bbox_x1 .. bbox_y2
//! SRC/[devkit/]cars_test_annos_withlabels.mat   the same for the test images
//! ```
//!
//! or the all-in-one version:
//!
//! ```text
//! SRC/car_ims/000001.jpg ..
//! SRC/cars_annos.mat                     annotations: relative_im_path, class, test (0 or 1);
//!                                        class_names
//! ```
//!
//! Train images go to `train/`, test images to `val/`, in class folders `000_AM_General_Hummer_SUV_2000`
//! .. (class `c` of the file is folder `c - 1`), named in `LOC_synset_mapping.txt`. The JPEGs
//! are hard-linked (or copied), keeping their names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};

use super::mat::MatValue;
use super::{
    class_dirs, mat_var, one_based, read_mat_file, DatasetKind, ImportOptions, ImportSummary,
    Output,
};

struct Placed {
    src: PathBuf,
    file_name: String,
    label: usize,
}

fn class_names(path: &Path, v: &MatValue) -> Result<Vec<Option<String>>> {
    let MatValue::Cell { items, .. } = v else {
        bail!(
            "{}: class_names is {}, expected a cell array of char",
            path.display(),
            v.kind()
        );
    };
    if items.is_empty() {
        bail!("{}: class_names is empty", path.display());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, c)| match c.text() {
            Some(t) => Ok(Some(t.trim().to_owned())),
            None => bail!(
                "{}: class_names{{{}}} is {}, expected text",
                path.display(),
                i + 1,
                c.kind()
            ),
        })
        .collect()
}

/// Field `field` of every element of the struct array `annotations` in `path`.
fn field_of<'a>(path: &Path, annos: &'a MatValue, i: usize, field: &str) -> Result<&'a MatValue> {
    match annos.field(i, field) {
        Some(v) => Ok(v),
        None => bail!(
            "{}: annotations({}) has no field {field:?} ({})",
            path.display(),
            i + 1,
            annos.kind()
        ),
    }
}

fn text_field(path: &Path, annos: &MatValue, i: usize, field: &str) -> Result<String> {
    let v = field_of(path, annos, i, field)?;
    v.text().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: annotations({}).{field} is {}, expected text",
            path.display(),
            i + 1,
            v.kind()
        )
    })
}

/// The images of one annotation file: `(file name relative to base, 0-based class, test flag)`.
fn annotations(
    path: &Path,
    name_field: &str,
    num_classes: usize,
) -> Result<Vec<(String, usize, bool)>> {
    let vars = read_mat_file(path)?;
    let annos = mat_var(path, &vars, "annotations")?;
    if !matches!(annos, MatValue::Struct { .. }) {
        bail!(
            "{}: annotations is {}, expected a struct array",
            path.display(),
            annos.kind()
        );
    }
    let mut out = Vec::with_capacity(annos.len());
    for i in 0..annos.len() {
        let name = text_field(path, annos, i, name_field)?;
        let class = one_based(
            path,
            &format!("annotations({}).class", i + 1),
            field_of(path, annos, i, "class")?,
            num_classes,
        )?;
        let [class] = class[..] else {
            bail!(
                "{}: annotations({}).class is not one number",
                path.display(),
                i + 1
            );
        };
        let test = match annos.field(i, "test").and_then(MatValue::numbers) {
            Some([t]) => *t != 0.0,
            _ => false,
        };
        out.push((name, class, test));
    }
    Ok(out)
}

fn find(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned()
}

/// Imports Stanford Cars (see the module docs).
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportSummary> {
    let start = Instant::now();
    let devkit = src.join("devkit");
    let all_in_one = src.join("cars_annos.mat");
    let mut plans: Vec<Vec<Placed>> = vec![Vec::new(), Vec::new()];
    let (names, notes) = if src.join("cars_train").is_dir() || devkit.is_dir() {
        let meta = find(&[devkit.join("cars_meta.mat"), src.join("cars_meta.mat")]);
        let Some(meta) = meta else {
            bail!("{}: missing", devkit.join("cars_meta.mat").display());
        };
        let vars = read_mat_file(&meta)?;
        let names = class_names(&meta, mat_var(&meta, &vars, "class_names")?)?;
        let files = [
            ("cars_train", "cars_train_annos.mat"),
            ("cars_test", "cars_test_annos_withlabels.mat"),
        ];
        let mut notes = Vec::new();
        for (s, (dir, annos)) in files.into_iter().enumerate() {
            let Some(path) = find(&[devkit.join(annos), src.join(annos)]) else {
                bail!(
                    "{}: missing (also looked in {}){}",
                    devkit.join(annos).display(),
                    src.display(),
                    if s == 1 {
                        ": the test labels come separately, as cars_test_annos_withlabels.mat"
                    } else {
                        ""
                    }
                );
            };
            notes.push(format!("{dir}/ labelled by {}", path.display()));
            for (name, label, _) in annotations(&path, "fname", names.len())? {
                plans[s].push(placed(src, &path, &format!("{dir}/{name}"), label)?);
            }
        }
        (names, notes)
    } else if all_in_one.is_file() {
        let vars = read_mat_file(&all_in_one)?;
        let names = class_names(&all_in_one, mat_var(&all_in_one, &vars, "class_names")?)?;
        for (name, label, test) in annotations(&all_in_one, "relative_im_path", names.len())? {
            plans[test as usize].push(placed(src, &all_in_one, &name, label)?);
        }
        (
            names,
            vec![format!("car_ims/ labelled by {}", all_in_one.display())],
        )
    } else {
        bail!(
            "{}: found neither cars_train/ and devkit/ nor cars_annos.mat: expected Stanford Cars",
            src.display()
        );
    };
    for (plan, split) in plans.iter().zip(["train", "val"]) {
        let mut seen = std::collections::HashMap::new();
        for p in plan {
            let key = shards::key::key_from_file_name(&p.file_name);
            if let Some(prev) = seen.insert(key.clone(), &p.src) {
                bail!(
                    "{} and {} give the same sample key {key:?} in {split}: file names must be unique",
                    prev.display(),
                    p.src.display()
                );
            }
        }
    }
    let mut output = Output::create(out, &["train", "val"], class_dirs(&names), opts.quiet)?;
    for (s, plan) in plans.iter().enumerate() {
        output.begin_split(s, plan.len());
        for p in plan {
            output.place_file(s, p.label, &p.file_name, &p.src)?;
        }
    }
    output.finish(DatasetKind::StanfordCars, notes, start)
}

fn placed(src: &Path, annos: &Path, rel: &str, label: usize) -> Result<Placed> {
    let rel_path = Path::new(rel);
    if rel_path
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!(
            "{}: image path {rel:?} is not a plain relative path",
            annos.display()
        );
    }
    let file = src.join(rel_path);
    if !file.is_file() {
        bail!("{}: missing (named in {})", file.display(), annos.display());
    }
    let file_name = rel_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(reason) = shards::key::check_key(&shards::key::key_from_file_name(&file_name)) {
        bail!("{}: cannot be a sample key: {reason}", file.display());
    }
    Ok(Placed {
        src: file,
        file_name,
        label,
    })
}
