//! Public data sets for transfer learning (CIFAR-10/100, iNaturalist 2019, Flowers-102,
//! Stanford Cars) in their distributed forms, turned into ImageNet-style folders that
//! `shard-imagenet` takes unchanged:
//!
//! ```text
//! OUT/train/<class>/<stem>.png|jpg     class folders named so that their sorted order is the
//! OUT/val/<class>/...                  data set's label order ("003_cat": label 3)
//! OUT/test/<class>/...                 Flowers-102's third split, only with --test-split test
//! OUT/LOC_synset_mapping.txt           "<class folder> <class name>" per line, where the data
//!                                      set names its classes
//! ```
//!
//! Everything is read and checked before anything is written (errors name the file and what was
//! expected). The splits are written under `OUT/.import-dataset.partial/` and renamed into `OUT`
//! when complete, so an interrupted run leaves no half-written `train/` or `val/`.

pub mod cars;
pub mod cifar;
pub mod flowers;
pub mod inat;
pub mod mat;
pub mod pickle;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::progress::Progress;

/// The largest metadata file (pickle, `.mat`, JSON) read into memory: 1 GiB (CIFAR-100's
/// `train` pickle is 155 MB, iNaturalist 2019's `train2019.json` 32 MB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// The temporary folder in `OUT` that splits are written to (ignored by `shard-imagenet`, which
/// skips names starting with `.`).
pub const PARTIAL_DIR: &str = ".import-dataset.partial";

/// Which CIFAR-100 labels become the classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar100Labels {
    /// The 100 fine classes.
    Fine,
    /// The 20 superclasses.
    Coarse,
}

/// Where Flowers-102's test images (`tstid`) go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestSplit {
    /// `train/` = trnid, `val/` = valid, `test/` = tstid (the data set's three splits;
    /// `shard-imagenet` shards train/ and val/ only).
    Test,
    /// `train/` = trnid + valid, `val/` = tstid (the usual transfer protocol: fit on the 2,040
    /// train+val images, report on the 6,149 test images).
    Val,
}

/// Settings of [`import`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// CIFAR-100 only: fine or coarse labels.
    pub cifar100_labels: Cifar100Labels,
    /// Flowers-102 only: where the test images go.
    pub test_split: TestSplit,
    /// No progress output.
    pub quiet: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            cifar100_labels: Cifar100Labels::Fine,
            test_split: TestSplit::Test,
            quiet: true,
        }
    }
}

/// The data sets understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// CIFAR-10, binary or Python version.
    Cifar10,
    /// CIFAR-100, binary or Python version.
    Cifar100,
    /// Oxford Flowers-102.
    Flowers102,
    /// Stanford Cars.
    StanfordCars,
    /// iNaturalist 2019.
    Inat2019,
}

impl DatasetKind {
    /// The command-line names, in the order of [`DatasetKind::ALL`].
    pub const NAMES: [&'static str; 5] = [
        "cifar10",
        "cifar100",
        "flowers102",
        "stanford-cars",
        "inat2019",
    ];
    /// Every kind.
    pub const ALL: [DatasetKind; 5] = [
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::Flowers102,
        DatasetKind::StanfordCars,
        DatasetKind::Inat2019,
    ];

    /// The kind named `name` on the command line.
    pub fn parse(name: &str) -> Result<Self> {
        match Self::NAMES.iter().position(|n| *n == name) {
            Some(i) => Ok(Self::ALL[i]),
            None => bail!(
                "unknown data set {name:?}: expected one of {}",
                Self::NAMES.join(", ")
            ),
        }
    }
}

/// One class of the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassDir {
    /// Folder name; the folders sort in label order.
    pub dir: String,
    /// Class name for `LOC_synset_mapping.txt`, if the data set names its classes.
    pub name: Option<String>,
}

/// Class folders for `names` (in label order): `<index>_<name>`, the index zero-padded to at
/// least 3 digits so that sorted folder names are in label order, the name with every character
/// outside `[A-Za-z0-9_-]` replaced by `_`. Without names, just the index.
pub fn class_dirs(names: &[Option<String>]) -> Vec<ClassDir> {
    let width = names.len().saturating_sub(1).to_string().len().max(3);
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let dir = match name {
                Some(n) => {
                    let safe: String = n
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    format!("{i:0width$}_{safe}")
                }
                None => format!("{i:0width$}"),
            };
            ClassDir {
                dir,
                name: name.clone(),
            }
        })
        .collect()
}

/// What one split of an import wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitSummary {
    /// `train`, `val` or `test`.
    pub name: String,
    /// Files written per class, in label order.
    pub num_per_class: Vec<usize>,
    /// Bytes written (copied or linked files counted at their size).
    pub bytes: u64,
}

impl SplitSummary {
    /// Files written.
    pub fn num_files(&self) -> usize {
        self.num_per_class.iter().sum()
    }
}

/// What [`import`] wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// The data set.
    pub kind: DatasetKind,
    /// What was read (form and files), for the summary.
    pub notes: Vec<String>,
    /// Classes in label order.
    pub classes: Vec<ClassDir>,
    /// The splits written, train first.
    pub splits: Vec<SplitSummary>,
    /// Files hard-linked rather than copied.
    pub num_linked: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Writes the ImageNet-style folder: class folders under a temporary folder, files added one by
/// one, then renamed into place by [`Output::finish`].
pub struct Output {
    out: PathBuf,
    partial: PathBuf,
    classes: Vec<ClassDir>,
    splits: Vec<SplitSummary>,
    num_linked: usize,
    progress: Option<(usize, Progress)>,
    quiet: bool,
}

impl Output {
    /// Checks that `out` holds none of `splits` and creates their class folders under
    /// `out/.import-dataset.partial/` (removing one left by an interrupted run).
    pub fn create(
        out: &Path,
        splits: &[&str],
        classes: Vec<ClassDir>,
        quiet: bool,
    ) -> Result<Self> {
        for split in splits {
            if out.join(split).exists() {
                bail!(
                    "{} already exists: choose a new output directory or delete it",
                    out.join(split).display()
                );
            }
        }
        let partial = out.join(PARTIAL_DIR);
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        for split in splits {
            for c in &classes {
                let d = partial.join(split).join(&c.dir);
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
        Ok(Output {
            out: out.to_owned(),
            partial,
            splits: splits
                .iter()
                .map(|s| SplitSummary {
                    name: s.to_string(),
                    num_per_class: vec![0; classes.len()],
                    bytes: 0,
                })
                .collect(),
            classes,
            num_linked: 0,
            progress: None,
            quiet,
        })
    }

    /// Starts the progress display of split `split` (an index into the splits given to
    /// [`Output::create`]), for `total` files.
    pub fn begin_split(&mut self, split: usize, total: usize) {
        if let Some((_, p)) = self.progress.take() {
            p.finish();
        }
        let name = &self.splits[split].name;
        self.progress = Some((split, Progress::new(name, total as u64, self.quiet)));
    }

    fn path(&self, split: usize, label: usize, file_name: &str) -> PathBuf {
        self.partial
            .join(&self.splits[split].name)
            .join(&self.classes[label].dir)
            .join(file_name)
    }

    fn count(&mut self, split: usize, label: usize, bytes: u64) {
        let s = &mut self.splits[split];
        s.num_per_class[label] += 1;
        s.bytes += bytes;
        if let Some((_, p)) = &mut self.progress {
            p.add(1, bytes);
        }
    }

    /// Writes `rgb` (`width * height * 3` bytes, rows top to bottom) as `<stem>.png` of class
    /// `label` in split `split`.
    pub fn write_png(
        &mut self,
        split: usize,
        label: usize,
        stem: &str,
        width: u32,
        height: u32,
        rgb: &[u8],
    ) -> Result<()> {
        use image::ImageEncoder;
        let path = self.path(split, label, &format!("{stem}.png"));
        let mut png = Vec::with_capacity(rgb.len() + 256);
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("encoding {}", path.display()))?;
        std::fs::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
        self.count(split, label, png.len() as u64);
        Ok(())
    }

    /// Hard-links `src` as `file_name` of class `label` in split `split`, or copies it where a
    /// link cannot be made (another file system).
    pub fn place_file(
        &mut self,
        split: usize,
        label: usize,
        file_name: &str,
        src: &Path,
    ) -> Result<()> {
        let dst = self.path(split, label, file_name);
        let size = match std::fs::hard_link(src, &dst) {
            Ok(()) => {
                self.num_linked += 1;
                std::fs::metadata(&dst)
                    .with_context(|| format!("stat {}", dst.display()))?
                    .len()
            }
            Err(_) => std::fs::copy(src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?,
        };
        self.count(split, label, size);
        Ok(())
    }

    /// Renames the splits into `out` and writes `LOC_synset_mapping.txt` if the classes have
    /// names.
    pub fn finish(
        mut self,
        kind: DatasetKind,
        notes: Vec<String>,
        start: Instant,
    ) -> Result<ImportSummary> {
        if let Some((_, p)) = self.progress.take() {
            p.finish();
        }
        if self.classes.iter().any(|c| c.name.is_some()) {
            let text: String = self
                .classes
                .iter()
                .map(|c| match &c.name {
                    Some(n) => format!("{} {}\n", c.dir, n.trim()),
                    None => format!("{}\n", c.dir),
                })
                .collect();
            let tmp = self.partial.join("LOC_synset_mapping.txt");
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            let dst = self.out.join("LOC_synset_mapping.txt");
            std::fs::rename(&tmp, &dst).with_context(|| format!("writing {}", dst.display()))?;
        }
        for s in &self.splits {
            let (from, to) = (self.partial.join(&s.name), self.out.join(&s.name));
            std::fs::rename(&from, &to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        }
        std::fs::remove_dir(&self.partial)
            .with_context(|| format!("removing {}", self.partial.display()))?;
        Ok(ImportSummary {
            kind,
            notes,
            classes: self.classes,
            splits: self.splits,
            num_linked: self.num_linked,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Reads a whole metadata file, at most [`MAX_FILE_BYTES`].
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_FILE_BYTES {
        bail!(
            "{}: {len} bytes, more than the {MAX_FILE_BYTES} bytes expected of this file",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Imports data set `kind` from `src` (its distributed form, see the module of each data set)
/// into the ImageNet-style folder `out`.
pub fn import(
    kind: DatasetKind,
    src: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportSummary> {
    if !src.is_dir() {
        bail!("{}: not a directory", src.display());
    }
    match kind {
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => cifar::import(kind, src, out, opts),
        DatasetKind::Inat2019 => inat::import(src, out, opts),
        DatasetKind::Flowers102 => flowers::import(src, out, opts),
        DatasetKind::StanfordCars => cars::import(src, out, opts),
    }
}

/// Reads a MAT-file's variables; errors name the file.
pub fn read_mat_file(path: &Path) -> Result<Vec<(String, mat::MatValue)>> {
    let bytes = read_file(path)?;
    mat::read_mat(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Variable `name` of the MAT-file `path`, read into `vars`.
pub fn mat_var<'a>(
    path: &Path,
    vars: &'a [(String, mat::MatValue)],
    name: &str,
) -> Result<&'a mat::MatValue> {
    mat::var(vars, name).ok_or_else(|| {
        let found: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        anyhow::anyhow!(
            "{}: no variable {name:?} (found: {})",
            path.display(),
            found.join(", ")
        )
    })
}

/// The elements of numeric variable `what` as 1-based indices from 1 to `max`, returned
/// 0-based; an error naming the file, the variable and the element otherwise.
pub fn one_based(path: &Path, what: &str, value: &mat::MatValue, max: usize) -> Result<Vec<usize>> {
    let Some(numbers) = value.numbers() else {
        bail!(
            "{}: {what} is {}, expected numbers",
            path.display(),
            value.kind()
        );
    };
    numbers
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.fract() == 0.0 && v >= 1.0 && v <= max as f64 {
                Ok(v as usize - 1)
            } else {
                bail!(
                    "{}: {what}({}) is {v}, expected an integer from 1 to {max}",
                    path.display(),
                    i + 1
                )
            }
        })
        .collect()
}
