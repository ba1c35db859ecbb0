//! The on-disk data set format: WebDataset-compatible tar shards, a binary index per shard,
//! and a manifest. No pixels are touched here.
//!
//! A data set directory looks like this:
//!
//! ```text
//! DST/manifest.json          format version, classes, per-split shard lists with sizes and SHA-256
//! DST/report.json            what `shard-imagenet` converted or skipped, and why
//! DST/train/train-000000.tar members <key>.jpg and <key>.cls, a sample's members adjacent
//! DST/train/train-000000.idx fixed-size records: offset, length, label, CRC-32, key (see [`index`])
//! ```
//!
//! [`Dataset::open`] reads and checks the manifest, [`Dataset::split`] memory-maps every shard and
//! index of a split and checks them up front, and [`Split::get`] returns a [`Sample`] (key, JPEG
//! bytes borrowed from the mapping, label) by global sample index without parsing tar.
//! [`verify()`] re-reads everything, checksums included, and lists every problem it finds.
#![deny(missing_docs)]

mod error;
pub mod index;
pub mod key;
pub mod manifest;
mod reader;
mod verify;
mod writer;

pub use error::{Error, Result};
pub use index::{IndexEntry, ShardIndex};
pub use manifest::{ClassInfo, Manifest, ShardInfo, SplitInfo};
pub use reader::{Dataset, Sample, Split};
pub use verify::{verify, Problem, VerifyReport};
pub use writer::{ShardWriter, WrittenShard};

/// Name of the manifest file at the root of a data set directory.
pub const MANIFEST_FILE: &str = "manifest.json";
