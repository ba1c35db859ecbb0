//! Oxford Flowers-102 (Nilsback and Zisserman, 2008) as distributed:
//!
//! ```text
//! SRC/jpg/image_00001.jpg ..    the 8,189 images (102flowers.tgz)
//! SRC/imagelabels.mat           labels: 1 x 8189, class 1 to 102 of image i
//! SRC/setid.mat                 trnid, valid, tstid: 1-based image numbers of the three splits
//! ```
//!
//! Classes are folders `000` .. `101` (label `L` of the file is folder `L - 1`; the files name no
//! classes, so no `LOC_synset_mapping.txt` is written). With `--split-for-test test` (default)
//! the data set's splits are kept: `train/` from trnid, `val/` from valid and `test/` from tstid
//! (`shard-imagenet` shards `train/` and `val/`; shard `test/` by pointing it at a folder where
//! it is named `val/`). With `--split-for-test val`: `train/` = trnid + valid, `val/` = tstid,
//! the usual protocol for transfer results. The JPEGs are hard-linked (or copied), keeping their
//! names.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

use super::{
    class_dirs, mat_var, one_based, read_mat_file, DatasetKind, ImportOptions, ImportSummary,
    Output, TestSplit,
};

/// Number of classes.
pub const NUM_CLASSES: usize = 102;

/// The image file of 1-based image number `n`.
pub fn image_name(n: usize) -> String {
    format!("image_{n:05}.jpg")
}

/// Imports Flowers-102 (see the module docs).
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportSummary> {
    let start = Instant::now();
    let labels_path = src.join("imagelabels.mat");
    let setid_path = src.join("setid.mat");
    for p in [&labels_path, &setid_path] {
        if !p.is_file() {
            bail!(
                "{}: missing: expected Flowers-102's imagelabels.mat, setid.mat and jpg/ in {}",
                p.display(),
                src.display()
            );
        }
    }
    let vars = read_mat_file(&labels_path)?;
    let labels = one_based(
        &labels_path,
        "labels",
        mat_var(&labels_path, &vars, "labels")?,
        NUM_CLASSES,
    )?;
    let vars = read_mat_file(&setid_path)?;
    let mut ids = Vec::new();
    for name in ["trnid", "valid", "tstid"] {
        let v = mat_var(&setid_path, &vars, name)?;
        ids.push(one_based(&setid_path, name, v, labels.len())?);
    }
    let mut split_of = vec![None; labels.len()];
    for (s, name) in ["trnid", "valid", "tstid"].iter().enumerate() {
        for &i in &ids[s] {
            if let Some(prev) = split_of[i].replace(*name) {
                bail!(
                    "{}: image {} is in both {prev} and {name}",
                    setid_path.display(),
                    i + 1
                );
            }
        }
    }
    let (split_names, plan): (Vec<&str>, Vec<Vec<usize>>) = match opts.test_split {
        TestSplit::Test => (vec!["train", "val", "test"], ids),
        TestSplit::Val => {
            let mut train = ids[0].clone();
            train.extend(&ids[1]);
            (vec!["train", "val"], vec![train, ids[2].clone()])
        }
    };
    for images in &plan {
        for &i in images {
            let p = src.join("jpg").join(image_name(i + 1));
            if !p.is_file() {
                bail!(
                    "{}: missing (image {} of {})",
                    p.display(),
                    i + 1,
                    setid_path.display()
                );
            }
        }
    }
    let notes = vec![format!(
        "{} labelled images, splits {} / {} / {} (trnid / valid / tstid){}",
        labels.len(),
        plan_len(&split_of, "trnid"),
        plan_len(&split_of, "valid"),
        plan_len(&split_of, "tstid"),
        match opts.test_split {
            TestSplit::Test => ": train/, val/, test/",
            TestSplit::Val => ": trnid + valid to train/, tstid to val/",
        }
    )];
    let mut output = Output::create(
        out,
        &split_names,
        class_dirs(&vec![None; NUM_CLASSES]),
        opts.quiet,
    )?;
    for (s, images) in plan.iter().enumerate() {
        output.begin_split(s, images.len());
        for &i in images {
            let name = image_name(i + 1);
            output.place_file(s, labels[i], &name, &src.join("jpg").join(&name))?;
        }
    }
    output.finish(DatasetKind::Flowers102, notes, start)
}

fn plan_len(split_of: &[Option<&str>], name: &str) -> usize {
    split_of.iter().filter(|s| **s == Some(name)).count()
}
