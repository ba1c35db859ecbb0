//! iNaturalist 2019 (FGVC6): SRC holds `train2019.json` and `val2019.json` (COCO style) and the
//! image tree they name:
//!
//! ```text
//! train2019.json   {"images": [{"id", "file_name", "width", "height", ...}],
//!                   "annotations": [{"image_id", "category_id", ...}],
//!                   "categories": [{"id", "name", ...}]}
//! val2019.json     the same; its categories must be the training file's
//! train_val2019/Plants/400/<hash>.jpg ...   file_name is relative to SRC
//! ```
//!
//! Classes are the categories sorted by id (label = position). Every image must have exactly one
//! annotation naming a known category, and every file must exist, before anything is written.
//! The JPEGs are hard-linked into `OUT/<split>/<class>/<file name>` (copied when OUT is on
//! another file system); file names must be unique within a split, as their stems are the
//! sample keys.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;

use super::{class_dirs, read_file, DatasetKind, ImportOptions, ImportSummary, Output};

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    image_id: i64,
    category_id: i64,
}

#[derive(Deserialize, Clone, PartialEq)]
struct CocoCategory {
    id: i64,
    #[serde(default)]
    name: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Coco {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
    #[serde(default)]
    categories: Option<Vec<CocoCategory>>,
}

/// The two splits: output folder and annotation file.
pub const SPLITS: [(&str, &str); 2] = [("train", "train2019.json"), ("val", "val2019.json")];

struct Placed {
    src: PathBuf,
    file_name: String,
    label: usize,
}

fn read_coco(path: &Path) -> Result<Coco> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        anyhow!(
            "{}: {e}: expected COCO-style JSON with images, annotations and categories",
            path.display()
        )
    })
}

/// Checks one split's images and annotations against the classes; returns the files to place.
fn plan_split(
    src: &Path,
    path: &Path,
    coco: &Coco,
    label_of: &HashMap<i64, usize>,
) -> Result<Vec<Placed>> {
    let mut category_of: HashMap<i64, Option<i64>> =
        coco.images.iter().map(|im| (im.id, None)).collect();
    if category_of.len() != coco.images.len() {
        let mut seen = std::collections::HashSet::new();
        let dup = coco
            .images
            .iter()
            .find(|im| !seen.insert(im.id))
            .expect("a duplicate");
        bail!(
            "{}: image id {} appears twice in images",
            path.display(),
            dup.id
        );
    }
    for (i, a) in coco.annotations.iter().enumerate() {
        let Some(slot) = category_of.get_mut(&a.image_id) else {
            bail!(
                "{}: annotations[{i}] names image id {}, which is not in images",
                path.display(),
                a.image_id
            );
        };
        if slot.is_some() {
            bail!(
                "{}: image id {} has more than one annotation: expected exactly one",
                path.display(),
                a.image_id
            );
        }
        if !label_of.contains_key(&a.category_id) {
            bail!(
                "{}: annotations[{i}] (image id {}) has category_id {}, which is not among the {} categories",
                path.display(),
                a.image_id,
                a.category_id,
                label_of.len()
            );
        }
        *slot = Some(a.category_id);
    }
    let mut out = Vec::with_capacity(coco.images.len());
    let mut names: HashMap<String, &str> = HashMap::new();
    for im in &coco.images {
        let Some(category) = category_of[&im.id] else {
            bail!(
                "{}: image id {} ({}) has no annotation: expected exactly one",
                path.display(),
                im.id,
                im.file_name
            );
        };
        let rel = Path::new(&im.file_name);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            bail!(
                "{}: file_name {:?} is not a plain relative path",
                path.display(),
                im.file_name
            );
        }
        let file = src.join(rel);
        if !file.is_file() {
            bail!(
                "{}: missing (image id {} of {})",
                file.display(),
                im.id,
                path.display()
            );
        }
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = shards::key::key_from_file_name(&file_name);
        if let Err(reason) = shards::key::check_key(&key) {
            bail!("{}: cannot be a sample key: {reason}", file.display());
        }
        if let Some(prev) = names.insert(key.clone(), &im.file_name) {
            bail!(
                "{}: {prev} and {} give the same sample key {key:?}: file names must be unique in a split",
                path.display(),
                im.file_name
            );
        }
        out.push(Placed {
            src: file,
            file_name,
            label: label_of[&category],
        });
    }
    Ok(out)
}

/// Imports iNaturalist 2019 (see the module docs).
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportSummary> {
    let start = Instant::now();
    let mut cocos = Vec::new();
    for (_, file) in SPLITS {
        let path = src.join(file);
        if !path.is_file() {
            bail!(
                "{}: missing: expected iNaturalist 2019's train2019.json and val2019.json in {}",
                path.display(),
                src.display()
            );
        }
        let coco = read_coco(&path)?;
        cocos.push((path, coco));
    }
    let (train_path, train) = &cocos[0];
    let Some(categories) = &train.categories else {
        bail!("{}: no categories", train_path.display());
    };
    let mut by_id: BTreeMap<i64, &CocoCategory> = BTreeMap::new();
    for c in categories {
        if by_id.insert(c.id, c).is_some() {
            bail!(
                "{}: category id {} appears twice",
                train_path.display(),
                c.id
            );
        }
    }
    if by_id.is_empty() {
        bail!("{}: no categories", train_path.display());
    }
    let (val_path, val) = &cocos[1];
    if let Some(vc) = &val.categories {
        let mut vc: Vec<&CocoCategory> = vc.iter().collect();
        vc.sort_by_key(|c| c.id);
        if vc.iter().map(|c| c.id).ne(by_id.keys().copied()) {
            bail!(
                "{}: {} categories, not the {} of {}",
                val_path.display(),
                vc.len(),
                by_id.len(),
                train_path.display()
            );
        }
    }
    let label_of: HashMap<i64, usize> = by_id.keys().enumerate().map(|(i, &id)| (id, i)).collect();
    let names: Vec<Option<String>> = by_id
        .values()
        .map(|c| match &c.name {
            Some(serde_json::Value::String(n)) if !n.trim().is_empty() => Some(n.trim().to_owned()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    let mut plans = Vec::new();
    for (path, coco) in &cocos {
        plans.push(plan_split(src, path, coco, &label_of)?);
    }
    let notes = vec![format!(
        "{} categories (ids {} to {}) from {}",
        by_id.len(),
        by_id.keys().next().expect("not empty"),
        by_id.keys().next_back().expect("not empty"),
        train_path.display()
    )];
    let mut output = Output::create(out, &["train", "val"], class_dirs(&names), opts.quiet)?;
    for (s, plan) in plans.iter().enumerate() {
        output.begin_split(s, plan.len());
        for p in plan {
            output.place_file(s, p.label, &p.file_name, &p.src)?;
        }
    }
    output.finish(DatasetKind::Inat2019, notes, start)
}
