//! ImageNet-ReaL: the reassessed validation labels of Beyer et al. (2020), "Are we done with
//! ImageNet?".
//!
//! `real.json` is one list of class indices per validation image, in the order of the ILSVRC2012
//! validation file names (`ILSVRC2012_val_00000001.JPEG` first). An image with an empty list is
//! not counted; a prediction is right if it is in the list (top-5: if any of the five is). The
//! shards keep each image's file name as its sample key, so images are matched by name
//! (`ILSVRC2012_val_00000042` is entry 41), never by position in the shards, which may be
//! shuffled or hold a subset.

use std::path::{Path, PathBuf};

use shards::Split;

use super::{Result, TrainError};

/// Key prefix of an ILSVRC2012 validation image.
pub const VAL_KEY_PREFIX: &str = "ILSVRC2012_val_";

/// The contents of a `real.json`.
#[derive(Clone, Debug)]
pub struct RealLabels {
    path: PathBuf,
    lists: Vec<Vec<u32>>,
}

/// ReaL label lists of the samples of one split, by split index (empty: not counted).
#[derive(Clone, Debug, Default)]
pub struct SplitReal {
    lists: Vec<Vec<u32>>,
}

impl SplitReal {
    /// The label list of split sample `index` (empty when the image is not counted, or when
    /// `index` is beyond the samples mapped).
    pub fn labels(&self, index: usize) -> &[u32] {
        self.lists.get(index).map_or(&[], Vec::as_slice)
    }

    /// Samples with a non-empty list.
    pub fn num_counted(&self) -> usize {
        self.lists.iter().filter(|l| !l.is_empty()).count()
    }
}

impl RealLabels {
    /// Reads `path`: a JSON array with one array of class indices per validation image.
    pub fn load(path: &Path) -> Result<Self> {
        let err = |message: String| TrainError::Data {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let lists: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "expected ImageNet-ReaL labels: a JSON array with one array of class indices \
                 per validation image (real.json), found: {e}"
            ))
        })?;
        Ok(RealLabels {
            path: path.to_path_buf(),
            lists,
        })
    }

    /// From lists in memory (`path` names them in errors).
    pub fn from_lists(path: impl Into<PathBuf>, lists: Vec<Vec<u32>>) -> Self {
        RealLabels {
            path: path.into(),
            lists,
        }
    }

    /// Images the file covers.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    /// Whether the file covers no image.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// The lists of the first `num_samples` samples of `split` (0: all), matched by sample key.
    /// A key that is not an ILSVRC2012 validation name, an image number beyond the file, and a
    /// class index at or above `num_classes` are errors naming the sample.
    pub fn for_split(
        &self,
        split: &Split,
        num_samples: u64,
        num_classes: usize,
    ) -> Result<SplitReal> {
        let err = |message: String| TrainError::Data {
            path: self.path.clone(),
            message,
        };
        if let Some((i, c)) = self.lists.iter().enumerate().find_map(|(i, l)| {
            l.iter()
                .find(|&&c| c as usize >= num_classes)
                .map(|&c| (i, c))
        }) {
            return Err(err(format!(
                "entry {i} ({VAL_KEY_PREFIX}{:08}) holds class {c}, but the data set has \
                 {num_classes} classes",
                i + 1
            )));
        }
        let total = match num_samples {
            0 => split.len(),
            n => n.min(split.len()),
        };
        let mut lists = Vec::with_capacity(total as usize);
        for index in 0..total {
            let sample = split.get(index).map_err(|e| err(e.to_string()))?;
            let number = sample
                .key
                .strip_prefix(VAL_KEY_PREFIX)
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<usize>().ok())
                .filter(|&n| n >= 1);
            let Some(number) = number else {
                return Err(err(format!(
                    "sample {index} of split {:?} has key {:?}: ReaL labels are matched by \
                     ILSVRC2012 validation file name ({VAL_KEY_PREFIX}NNNNNNNN), so the shards \
                     must keep the original names",
                    split.name(),
                    sample.key
                )));
            };
            let Some(list) = self.lists.get(number - 1) else {
                return Err(err(format!(
                    "sample {index} of split {:?} is {:?}, but the file lists {} images: the \
                     file does not match the shards",
                    split.name(),
                    sample.key,
                    self.lists.len()
                )));
            };
            lists.push(list.clone());
        }
        Ok(SplitReal { lists })
    }
}
