//! Reading a shard set through memory maps.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::index::{IndexEntry, ShardIndex};
use crate::manifest::{Manifest, ShardInfo};

/// An opened shard set: its root directory and checked manifest.
#[derive(Clone, Debug)]
pub struct Dataset {
    root: PathBuf,
    manifest: Manifest,
}

/// One sample, borrowed from the memory-mapped shard.
#[derive(Clone, Copy, Debug)]
pub struct Sample<'a> {
    /// The WebDataset key.
    pub key: &'a str,
    /// The stored image bytes (a JPEG), straight from the mapping: no copy.
    pub jpeg: &'a [u8],
    /// Class index.
    pub label: u32,
    /// The shard the sample lives in.
    pub shard: &'a Path,
    /// Byte offset of `jpeg` in the shard.
    pub offset: u64,
    /// CRC-32 of `jpeg` recorded in the index (see [`Split::get_checked`]).
    pub crc32: u32,
}

/// All shards of one split, memory-mapped and checked, addressed by global sample index.
#[derive(Debug)]
pub struct Split {
    name: String,
    shards: Vec<MappedShard>,
    /// `starts[i]` is the global index of shard `i`'s first sample; one extra entry holds the total.
    starts: Vec<u64>,
}

#[derive(Debug)]
struct MappedShard {
    tar_path: PathBuf,
    tar: Mmap,
    index: Mmap,
}

/// Maps `path` read-only.
fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: a memory map is only sound while no one truncates or rewrites the file. Shard and
    // index files are written once under a temporary name and renamed into place, and nothing
    // in this project modifies them afterwards; a user who edits or truncates a shard while a
    // reader has it mapped can make reads fault (SIGBUS) or see changed bytes. This is the same
    // contract as ripgrep's and FFCV's memory-mapped readers; `verify` detects altered files.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl Dataset {
    /// Opens the shard set in directory `root`: reads `root/manifest.json` and checks its format
    /// version and consistency. Shards are opened by [`Dataset::split`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_owned();
        let manifest = Manifest::load(&root.join(crate::MANIFEST_FILE))?;
        Ok(Dataset { root, manifest })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The data set directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.manifest.classes.len()
    }

    /// Memory-maps every shard and index of split `name` and checks them: file sizes against the
    /// manifest, index magic, version and structure, every sample inside its shard's data, every
    /// label a valid class. O(samples) over the index entries; the image bytes are not read.
    pub fn split(&self, name: &str) -> Result<Split> {
        let info = self
            .manifest
            .splits
            .get(name)
            .ok_or_else(|| Error::UnknownSplit {
                name: name.to_owned(),
                known: self.manifest.splits.keys().cloned().collect(),
            })?;
        let mut shards = Vec::with_capacity(info.shards.len());
        let mut starts = vec![0u64];
        for s in &info.shards {
            let shard = open_shard(&self.root, s, self.num_classes())?;
            starts.push(starts.last().unwrap() + s.num_samples);
            shards.push(shard);
        }
        Ok(Split {
            name: name.to_owned(),
            shards,
            starts,
        })
    }
}

/// Opens and checks one shard; shared with `verify`.
fn open_shard(root: &Path, info: &ShardInfo, num_classes: usize) -> Result<MappedShard> {
    let tar_path = root.join(&info.tar);
    let index_path = root.join(&info.index);
    let tar = map(&tar_path)?;
    if tar.len() as u64 != info.tar_bytes {
        return Err(Error::ShardSize {
            shard: tar_path,
            expected: info.tar_bytes,
            found: tar.len() as u64,
        });
    }
    let index = map(&index_path)?;
    check_index(&index, &index_path, &tar_path, info, num_classes)?;
    Ok(MappedShard {
        tar_path,
        tar,
        index,
    })
}

/// Checks index bytes against the manifest's entry for the shard and the class count.
pub(crate) fn check_index(
    bytes: &[u8],
    index_path: &Path,
    tar_path: &Path,
    info: &ShardInfo,
    num_classes: usize,
) -> Result<()> {
    let idx = ShardIndex::parse(bytes, index_path, tar_path)?;
    let mismatch = |field, manifest, index| Error::IndexMismatch {
        path: index_path.to_owned(),
        field,
        manifest,
        index,
    };
    if idx.len() as u64 != info.num_samples {
        return Err(mismatch("num_samples", info.num_samples, idx.len() as u64));
    }
    if idx.tar_bytes() != info.tar_bytes {
        return Err(mismatch("tar_bytes", info.tar_bytes, idx.tar_bytes()));
    }
    for i in 0..idx.len() {
        let label = idx.entry(i).label;
        if label as usize >= num_classes {
            return Err(Error::LabelOutOfRange {
                shard: tar_path.to_owned(),
                sample: i as u64,
                key: idx.key(i).to_owned(),
                label,
                num_classes,
            });
        }
    }
    Ok(())
}

impl Split {
    /// The split's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    /// Whether the split holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Sample `index` (global over the split's shards, in manifest order). The shard is found by
    /// binary search over the shard starts, the sample by one index lookup: no tar parsing, no copy.
    pub fn get(&self, index: u64) -> Result<Sample<'_>> {
        if index >= self.len() {
            return Err(Error::SampleOutOfRange {
                split: self.name.clone(),
                index,
                len: self.len(),
            });
        }
        let shard_i = self.starts.partition_point(|&s| s <= index) - 1;
        let shard = &self.shards[shard_i];
        let local = (index - self.starts[shard_i]) as usize;
        // The index was fully checked when the split was opened.
        let idx = ShardIndex::parse_trusted(&shard.index);
        let IndexEntry {
            offset,
            len,
            label,
            crc32,
            ..
        } = idx.entry(local);
        Ok(Sample {
            key: idx.key(local),
            jpeg: &shard.tar[offset as usize..offset as usize + len as usize],
            label,
            shard: &shard.tar_path,
            offset,
            crc32,
        })
    }

    /// Like [`Split::get`], and also checks the bytes against the CRC-32 in the index.
    pub fn get_checked(&self, index: u64) -> Result<Sample<'_>> {
        let s = self.get(index)?;
        let found = crc32fast::hash(s.jpeg);
        if found != s.crc32 {
            return Err(Error::Checksum {
                shard: s.shard.to_owned(),
                key: s.key.to_owned(),
                offset: s.offset,
                expected: s.crc32,
                found,
            });
        }
        Ok(s)
    }
}
