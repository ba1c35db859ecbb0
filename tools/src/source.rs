//! Reading an ImageNet-style folder: classes, splits, files and labels.
//!
//! Layouts understood (SRC may also be the Kaggle download, whose images sit under
//! `ILSVRC/Data/CLS-LOC/` and whose label files sit in SRC itself):
//!
//! ```text
//! SRC/train/<wnid>/*.JPEG          class folders; classes are the sorted folder names (timm's order)
//! SRC/val/<wnid>/*.JPEG            validation in class folders, or
//! SRC/val/*.JPEG + a label file    flat validation with LOC_val_solution.csv (Kaggle) or
//!                                  "file label" lines (label: a wnid or a 0-based class index)
//! SRC/LOC_synset_mapping.txt       optional class names, "wnid name" per line
//! SRC/0/*.jpeg .. SRC/999/*.jpeg   ImageNet-V2 (an extracted imagenetv2-*.tar.gz): folders named
//!                                  by class index; one split, `val`
//! ```
//!
//! Names starting with `.` are ignored. Anything else unexpected is an error that names it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use shards::key::key_from_file_name;
use shards::ClassInfo;

/// One input file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSample {
    /// Absolute or SRC-joined path.
    pub path: PathBuf,
    /// Path relative to SRC, for reports.
    pub rel: String,
    /// WebDataset key (file stem).
    pub key: String,
    /// Class index.
    pub label: u32,
    /// File size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the epoch (to notice changed inputs on resume).
    pub mtime_ns: i128,
}

/// One split of the input.
#[derive(Clone, Debug)]
pub struct SourceSplit {
    /// `train` or `val`.
    pub name: String,
    /// Labelled files, sorted (train by class then name, val by name).
    pub samples: Vec<SourceSample>,
    /// Files that cannot be used, with the reason (such as a flat val file missing from the
    /// label file). They are reported as skipped.
    pub unusable: Vec<(String, String)>,
}

/// The whole input.
#[derive(Clone, Debug)]
pub struct Source {
    /// Classes in label order.
    pub classes: Vec<ClassInfo>,
    /// Splits found, train first.
    pub splits: Vec<SourceSplit>,
    /// Where labels and class names came from, for the summary.
    pub notes: Vec<String>,
}

/// Where to find label and synset files, when not at their usual names in SRC.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Label file for a flat `val/`.
    pub val_labels: Option<PathBuf>,
    /// Synset file (`wnid name` per line).
    pub synsets: Option<PathBuf>,
}

fn visible_entries(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if !e.file_name().to_string_lossy().starts_with('.') {
            out.push(e);
        }
    }
    out.sort_by_key(|e| e.file_name());
    Ok(out)
}

fn file_sample(src: &Path, entry: &std::fs::DirEntry, label: u32) -> Result<SourceSample> {
    let path = entry.path();
    let meta = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{}: expected an image file, found a directory or special file",
            path.display()
        );
    }
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    let name = entry.file_name().to_string_lossy().into_owned();
    Ok(SourceSample {
        rel: path
            .strip_prefix(src)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned(),
        path,
        key: key_from_file_name(&name),
        label,
        size: meta.len(),
        mtime_ns,
    })
}

fn subdirs(dir: &Path) -> Result<(Vec<String>, Vec<std::fs::DirEntry>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for e in visible_entries(dir)? {
        if e.path().is_dir() {
            dirs.push(e.file_name().to_string_lossy().into_owned());
        } else {
            files.push(e);
        }
    }
    Ok((dirs, files))
}

/// Scans `src`.
pub fn scan(src: &Path, opts: &ScanOptions) -> Result<Source> {
    let data = if src.join("train").is_dir() || src.join("val").is_dir() {
        src.to_owned()
    } else if src.join("ILSVRC/Data/CLS-LOC").is_dir() {
        src.join("ILSVRC/Data/CLS-LOC")
    } else if let Some(source) = scan_class_index_folders(src, opts)? {
        return Ok(source);
    } else {
        bail!(
            "{}: found neither train/ nor val/ (nor ILSVRC/Data/CLS-LOC/, nor ImageNet-V2's class \
             index folders 0/ .. 999/): expected an ImageNet folder",
            src.display()
        );
    };
    let mut notes = Vec::new();
    let synsets_path = opts.synsets.clone().or_else(|| {
        ["LOC_synset_mapping.txt", "synsets.txt"]
            .iter()
            .map(|n| src.join(n))
            .find(|p| p.is_file())
    });
    let synsets = match &synsets_path {
        Some(p) => {
            notes.push(format!("class names from {}", p.display()));
            read_synsets(p)?
        }
        None => Vec::new(),
    };

    // Classes: train folders, else val folders, else the synset file.
    let train_dir = data.join("train");
    let val_dir = data.join("val");
    let (train_classes, train_stray) = if train_dir.is_dir() {
        subdirs(&train_dir)?
    } else {
        (Vec::new(), Vec::new())
    };
    if let Some(f) = train_stray.first() {
        bail!(
            "{}: unexpected file in train/: expected only class folders (train/<wnid>/*.JPEG)",
            f.path().display()
        );
    }
    let (val_classes, val_files) = if val_dir.is_dir() {
        subdirs(&val_dir)?
    } else {
        (Vec::new(), Vec::new())
    };
    let wnids: Vec<String> = if !train_classes.is_empty() {
        train_classes.clone()
    } else if !val_classes.is_empty() {
        val_classes.clone()
    } else if !synsets.is_empty() {
        let mut w: Vec<String> = synsets.iter().map(|(w, _)| w.clone()).collect();
        w.sort();
        w
    } else {
        bail!(
            "{}: no class folders in train/ or val/, and no synset file to list the classes",
            data.display()
        );
    };
    let names: HashMap<&str, &str> = synsets
        .iter()
        .map(|(w, n)| (w.as_str(), n.as_str()))
        .collect();
    let classes: Vec<ClassInfo> = wnids
        .iter()
        .map(|w| ClassInfo {
            wnid: w.clone(),
            name: names.get(w.as_str()).map(|n| n.to_string()),
        })
        .collect();
    let class_of: HashMap<&str, u32> = wnids
        .iter()
        .enumerate()
        .map(|(i, w)| (w.as_str(), i as u32))
        .collect();

    let mut splits = Vec::new();
    if !train_classes.is_empty() {
        let mut samples = Vec::new();
        for (label, wnid) in train_classes.iter().enumerate() {
            let dir = train_dir.join(wnid);
            for e in visible_entries(&dir)? {
                samples.push(file_sample(src, &e, label as u32)?);
            }
        }
        splits.push(finish_split("train", samples, Vec::new())?);
    }
    if val_dir.is_dir() {
        if !val_classes.is_empty() {
            if let Some(f) = val_files.first() {
                bail!(
                    "{}: val/ mixes class folders and files: expected one or the other",
                    f.path().display()
                );
            }
            let mut samples = Vec::new();
            for wnid in &val_classes {
                let Some(&label) = class_of.get(wnid.as_str()) else {
                    bail!(
                        "{}: class folder {wnid:?} is not among the {} training classes",
                        val_dir.join(wnid).display(),
                        wnids.len()
                    );
                };
                for e in visible_entries(&val_dir.join(wnid))? {
                    samples.push(file_sample(src, &e, label)?);
                }
            }
            samples.sort_by(|a, b| a.key.cmp(&b.key));
            splits.push(finish_split("val", samples, Vec::new())?);
        } else if !val_files.is_empty() {
            let labels_path = opts.val_labels.clone().or_else(|| {
                ["LOC_val_solution.csv", "val_labels.txt"]
                    .iter()
                    .flat_map(|n| [src.join(n), data.join(n)])
                    .find(|p| p.is_file())
            });
            let Some(labels_path) = labels_path else {
                bail!(
                    "{}: flat validation folder ({} files) but no label file: pass --val-labels FILE (Kaggle LOC_val_solution.csv, or 'file label' lines)",
                    val_dir.display(),
                    val_files.len()
                );
            };
            notes.push(format!("val labels from {}", labels_path.display()));
            let labels = read_val_labels(&labels_path, &class_of, wnids.len())?;
            let mut samples = Vec::new();
            let mut unusable = Vec::new();
            for e in &val_files {
                let name = e.file_name().to_string_lossy().into_owned();
                match labels.get(&key_from_file_name(&name)) {
                    Some(&label) => samples.push(file_sample(src, e, label)?),
                    None => unusable.push((
                        format!("val/{name}"),
                        format!("no label in {}", labels_path.display()),
                    )),
                }
            }
            if samples.len() < labels.len() {
                notes.push(format!(
                    "{} of {} labelled val files are present",
                    samples.len(),
                    labels.len()
                ));
            }
            splits.push(finish_split("val", samples, unusable)?);
        }
    }
    if splits.is_empty() {
        bail!("{}: no images found in train/ or val/", data.display());
    }
    Ok(Source {
        classes,
        splits,
        notes,
    })
}

/// ImageNet-V2's layout: `src` holds only folders named by class index (`0` .. `999`), each of
/// images of that class. `None` if `src` is not laid out so (no folders, or a folder or file
/// with another name). The classes are the synset file's (sorted by wnid, timm's order) when one
/// is given, else one per index up to the largest folder's, named by the index.
fn scan_class_index_folders(src: &Path, opts: &ScanOptions) -> Result<Option<Source>> {
    if !src.is_dir() {
        return Ok(None);
    }
    let (dirs, files) = subdirs(src)?;
    if dirs.is_empty() || !files.is_empty() {
        return Ok(None);
    }
    let mut indexed = Vec::with_capacity(dirs.len());
    for d in &dirs {
        // Decimal without leading zeros, as the V2 archives name them.
        let canonical = d.parse::<u32>().ok().filter(|i| i.to_string() == *d);
        match canonical {
            Some(i) => indexed.push((i, d)),
            None => return Ok(None),
        }
    }
    indexed.sort();
    let largest = indexed.last().map_or(0, |(i, _)| *i) as usize;
    let mut notes = vec![format!(
        "ImageNet-V2 layout: {} class folders named by class index, one split (val)",
        indexed.len()
    )];
    let classes: Vec<ClassInfo> = match &opts.synsets {
        Some(path) => {
            let mut synsets = read_synsets(path)?;
            synsets.sort();
            if largest >= synsets.len() {
                bail!(
                    "{}: class folder {largest} is beyond the {} classes of {}",
                    src.join(largest.to_string()).display(),
                    synsets.len(),
                    path.display()
                );
            }
            notes.push(format!("class names from {}", path.display()));
            synsets
                .into_iter()
                .map(|(wnid, name)| ClassInfo {
                    wnid,
                    name: Some(name).filter(|n| !n.is_empty()),
                })
                .collect()
        }
        None => (0..=largest)
            .map(|i| ClassInfo {
                wnid: i.to_string(),
                name: None,
            })
            .collect(),
    };
    if indexed.len() < classes.len() {
        notes.push(format!(
            "{} of the {} classes have a folder",
            indexed.len(),
            classes.len()
        ));
    }
    let mut samples = Vec::new();
    for (label, dir) in indexed {
        for e in visible_entries(&src.join(dir))? {
            samples.push(file_sample(src, &e, label)?);
        }
    }
    samples.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Some(Source {
        classes,
        splits: vec![finish_split("val", samples, Vec::new())?],
        notes,
    }))
}

fn finish_split(
    name: &str,
    samples: Vec<SourceSample>,
    unusable: Vec<(String, String)>,
) -> Result<SourceSplit> {
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for s in &samples {
        if let Err(reason) = shards::key::check_key(&s.key) {
            bail!("{}: cannot be a sample key: {reason}", s.path.display());
        }
        if let Some(prev) = seen.insert(&s.key, &s.rel) {
            bail!(
                "{} and {prev} give the same sample key {:?} in split {name}: keys must be unique",
                s.rel,
                s.key
            );
        }
    }
    Ok(SourceSplit {
        name: name.into(),
        samples,
        unusable,
    })
}

/// Reads `wnid name...` lines (LOC_synset_mapping.txt, synsets.txt).
pub fn read_synsets(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (wnid, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if wnid.contains(',') {
            bail!(
                "{}:{}: expected 'wnid name', found {line:?}",
                path.display(),
                i + 1
            );
        }
        out.push((wnid.to_owned(), name.trim().to_owned()));
    }
    Ok(out)
}

/// Reads a validation label file into key -> class index. Kaggle's `LOC_val_solution.csv`
/// (`ImageId,PredictionString` with the wnid first) or plain `file label` lines, where the
/// label is a wnid or a 0-based index into the sorted classes.
pub fn read_val_labels(
    path: &Path,
    class_of: &HashMap<&str, u32>,
    num_classes: usize,
) -> Result<BTreeMap<String, u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("ImageId,")) {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let (file, label) = match line.split_once(',') {
            Some((id, pred)) => (id, pred.split_whitespace().next().unwrap_or("")),
            None => {
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(f), Some(l), None) => (f, l),
                    _ => bail!("{}: expected 'file label', found {line:?}", at()),
                }
            }
        };
        let label = match class_of.get(label) {
            Some(&l) => l,
            None => match label.parse::<u32>() {
                Ok(l) if (l as usize) < num_classes => l,
                _ => bail!(
                    "{}: label {label:?} is neither a known wnid nor a class index below {num_classes}",
                    at()
                ),
            },
        };
        let key = key_from_file_name(file);
        if out.insert(key.clone(), label).is_some() {
            bail!("{}: {key:?} is labelled twice", at());
        }
    }
    Ok(out)
}
