//! The data set manifest (`manifest.json`): format version, classes, and every shard of every
//! split with its size and checksums.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Value of [`Manifest::format`].
pub const FORMAT: &str = "rsb-shards";
/// The manifest format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest of a shard set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for manifests this code reads.
    pub format_version: u32,
    /// The program that wrote the shards, with its version.
    pub created_by: String,
    /// Classes in label order: label `i` is `classes[i]` (sorted WordNet ids, as timm orders them).
    pub classes: Vec<ClassInfo>,
    /// Splits by name (`train`, `val`).
    pub splits: BTreeMap<String, SplitInfo>,
    /// How the shards were built (options, plan digest); informational.
    #[serde(default)]
    pub build: BTreeMap<String, serde_json::Value>,
}

/// One class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassInfo {
    /// WordNet id (the folder name), such as `n01440764`.
    pub wnid: String,
    /// Human-readable name from the synset file, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitInfo {
    /// Total number of samples over all shards.
    pub num_samples: u64,
    /// Shards in order; global sample indices run through them in this order.
    pub shards: Vec<ShardInfo>,
}

/// One shard: its tar and index files, relative to the data set root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Path of the tar file, relative to the manifest's directory.
    pub tar: String,
    /// Path of the index file, relative to the manifest's directory.
    pub index: String,
    /// Samples in the shard.
    pub num_samples: u64,
    /// Size of the tar file in bytes.
    pub tar_bytes: u64,
    /// SHA-256 of the tar file, lowercase hex (compare with `sha256sum`).
    pub tar_sha256: String,
    /// Size of the index file in bytes.
    pub index_bytes: u64,
    /// SHA-256 of the index file, lowercase hex.
    pub index_sha256: String,
}

impl Manifest {
    /// An empty manifest of the current format.
    pub fn new(created_by: impl Into<String>, classes: Vec<ClassInfo>) -> Self {
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            created_by: created_by.into(),
            classes,
            splits: BTreeMap::new(),
            build: BTreeMap::new(),
        }
    }

    /// Reads `path` and checks its format, version and internal consistency.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses manifest bytes read from `path` (named in errors) and checks them.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self> {
        let parse_err = |error| Error::ManifestParse {
            path: path.to_owned(),
            error,
        };
        // Check the version before the strict parse, so that a newer format reports its
        // version instead of an unknown field.
        let value: serde_json::Value = serde_json::from_slice(text).map_err(parse_err)?;
        let invalid = |reason: String| Error::ManifestInvalid {
            path: path.to_owned(),
            reason,
        };
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            other => {
                return Err(invalid(format!(
                    "\"format\" is {other:?}, expected {FORMAT:?} (not a shard-imagenet manifest)"
                )))
            }
        }
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| invalid("\"format_version\" is missing or not a number".into()))?;
        if version != FORMAT_VERSION as u64 {
            return Err(Error::ManifestVersion {
                path: path.to_owned(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(parse_err)?;
        manifest.check().map_err(invalid)?;
        Ok(manifest)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.classes.is_empty() {
            return Err("the class list is empty".into());
        }
        for (name, split) in &self.splits {
            // Checked: counts near u64::MAX overflowed the sum (a fuzzing finding).
            let sum = split
                .shards
                .iter()
                .try_fold(0u64, |sum, s| sum.checked_add(s.num_samples));
            if sum != Some(split.num_samples) {
                let sum = sum.map_or("more than 2^64".to_owned(), |s| s.to_string());
                return Err(format!(
                    "split {name:?} says {} samples but its shards hold {sum}",
                    split.num_samples
                ));
            }
            for s in &split.shards {
                for p in [&s.tar, &s.index] {
                    let rel = Path::new(p);
                    if rel.is_absolute()
                        || rel
                            .components()
                            .any(|c| c == std::path::Component::ParentDir)
                    {
                        return Err(format!(
                            "shard path {p:?} must be relative and inside the data set directory"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the manifest to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(self).expect("manifest serialises");
        text.push(b'\n');
        write_atomically(path, &text)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and renamed,
/// so that `path` either holds the old contents or all of the new ones.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The temporary name a file is written under before it is renamed into place: `<name>.tmp`.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let mut m = Manifest::new(
            "test",
            vec![ClassInfo {
                wnid: "n0".into(),
                name: None,
            }],
        );
        m.splits.insert(
            "train".into(),
            SplitInfo {
                num_samples: 0,
                shards: vec![],
            },
        );
        m
    }

    #[test]
    fn round_trip_and_version_check() {
        let m = manifest();
        let text = serde_json::to_vec(&m).unwrap();
        let p = Path::new("m.json");
        assert_eq!(Manifest::parse(&text, p).unwrap(), m);

        let mut v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        v["format_version"] = 2.into();
        v["new_field"] = 1.into();
        let e = Manifest::parse(&serde_json::to_vec(&v).unwrap(), p)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m.json: manifest format version 2, this reader supports version 1 (re-run shard-imagenet with this version)"
        );
    }

    #[test]
    fn inconsistent_counts_are_rejected() {
        let mut m = manifest();
        m.splits.get_mut("train").unwrap().num_samples = 5;
        let text = serde_json::to_vec(&m).unwrap();
        let e = Manifest::parse(&text, Path::new("m.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m.json: split \"train\" says 5 samples but its shards hold 0"
        );
    }

    #[test]
    fn shard_counts_that_overflow_are_rejected() {
        // A fuzzing finding: the sum of the shards' counts overflowed.
        let mut m = manifest();
        let shard = ShardInfo {
            tar: "train/a.tar".into(),
            index: "train/a.idx".into(),
            num_samples: u64::MAX,
            tar_bytes: 1024,
            tar_sha256: String::new(),
            index_bytes: 64,
            index_sha256: String::new(),
        };
        let split = m.splits.get_mut("train").unwrap();
        split.shards = vec![shard.clone(), shard];
        let text = serde_json::to_vec(&m).unwrap();
        let e = Manifest::parse(&text, Path::new("m.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m.json: split \"train\" says 0 samples but its shards hold more than 2^64"
        );
    }
}
