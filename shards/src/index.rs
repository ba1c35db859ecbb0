//! The binary shard index (`<shard>.idx`): O(1) access to any sample of a memory-mapped shard.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "SHRDIDX\0"
//! 8       4     version (1)
//! 12      4     entry size in bytes (32)
//! 16      8     number of samples N
//! 24      8     size of the tar file in bytes
//! 32      8     size of the key table in bytes K
//! 40      24    reserved, zero
//! 64      32*N  entries, in tar order:
//!                 u64 offset of the image member's data in the tar
//!                 u32 length of the image data
//!                 u32 label (class index)
//!                 u32 offset of the key in the key table
//!                 u32 length of the key
//!                 u32 CRC-32 (IEEE) of the image data
//!                 u32 reserved, zero
//! 64+32N  K     key table: the keys, UTF-8, concatenated
//! ```
//!
//! The file is exactly `64 + 32 N + K` bytes long; anything else is corruption.

use std::path::Path;

use crate::error::{Error, Result};

/// First eight bytes of every index file.
pub const MAGIC: &[u8; 8] = b"SHRDIDX\0";
/// The index format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 64;
/// Size of one entry in bytes.
pub const ENTRY_BYTES: usize = 32;

/// One sample's entry in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Byte offset of the image member's data in the tar file.
    pub offset: u64,
    /// Length of the image data in bytes.
    pub len: u32,
    /// Class index.
    pub label: u32,
    /// Offset of the key in the key table.
    pub key_offset: u32,
    /// Length of the key in bytes.
    pub key_len: u32,
    /// CRC-32 (IEEE) of the image data.
    pub crc32: u32,
}

/// A parsed view of an index file's bytes (usually a memory map). Construction checks the
/// header, the file length, that every key lies in the key table and is valid UTF-8, and that
/// every sample lies inside the tar data; after that, [`ShardIndex::entry`] and
/// [`ShardIndex::key`] are infallible.
#[derive(Debug)]
pub struct ShardIndex<'a> {
    bytes: &'a [u8],
    num_samples: usize,
    tar_bytes: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<'a> ShardIndex<'a> {
    /// Parses and checks `bytes`, the contents of index file `path` (named in errors) that
    /// belongs to tar file `shard`.
    pub fn parse(bytes: &'a [u8], path: &Path, shard: &Path) -> Result<Self> {
        let corrupt = |reason: String| Error::IndexCorrupt {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(Error::IndexMagic {
                path: path.to_owned(),
                found: bytes[..bytes.len().min(8)].to_vec(),
            });
        }
        if bytes.len() < HEADER_BYTES {
            return Err(corrupt(format!(
                "file is {} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(Error::IndexVersion {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        let entry_bytes = u32_at(bytes, 12) as usize;
        if entry_bytes != ENTRY_BYTES {
            return Err(corrupt(format!(
                "entry size {entry_bytes}, expected {ENTRY_BYTES}"
            )));
        }
        let num_samples = u64_at(bytes, 16);
        let tar_bytes = u64_at(bytes, 24);
        let keys_bytes = u64_at(bytes, 32);
        let expected_len =
            (num_samples as u128) * ENTRY_BYTES as u128 + HEADER_BYTES as u128 + keys_bytes as u128;
        if expected_len != bytes.len() as u128 {
            return Err(corrupt(format!(
                "file is {} bytes, but its header ({num_samples} samples, {keys_bytes}-byte key table) implies {expected_len} (truncated index?)",
                bytes.len()
            )));
        }
        let index = ShardIndex {
            bytes,
            num_samples: num_samples as usize,
            tar_bytes,
        };
        // The last 1024 bytes of a tar are the end-of-archive blocks; data must end before them.
        let data_end = tar_bytes.saturating_sub(1024);
        let keys = index.key_table();
        for i in 0..index.num_samples {
            let e = index.entry(i);
            let key_end = e.key_offset as u64 + e.key_len as u64;
            let key = keys
                .get(e.key_offset as usize..key_end as usize)
                .ok_or_else(|| {
                    corrupt(format!(
                        "sample {i}: key bytes {}..{key_end} lie outside the {}-byte key table",
                        e.key_offset,
                        keys.len()
                    ))
                })?;
            let key = std::str::from_utf8(key)
                .map_err(|_| corrupt(format!("sample {i}: key is not valid UTF-8")))?;
            // checked_add: an offset near u64::MAX overflowed (a fuzzing finding,
            // fuzz/regressions/shard_index/).
            if e.offset
                .checked_add(e.len as u64)
                .is_none_or(|end| end > data_end)
            {
                return Err(Error::SamplePastEnd {
                    shard: shard.to_owned(),
                    sample: i as u64,
                    key: key.to_owned(),
                    offset: e.offset,
                    len: e.len as u64,
                    data_end,
                });
            }
        }
        Ok(index)
    }

    /// A view of index bytes that [`ShardIndex::parse`] has already accepted. Reads only the
    /// header; panics if the bytes are too short to hold it.
    pub(crate) fn parse_trusted(bytes: &'a [u8]) -> Self {
        ShardIndex {
            bytes,
            num_samples: u64_at(bytes, 16) as usize,
            tar_bytes: u64_at(bytes, 24),
        }
    }

    /// Number of samples in the shard.
    pub fn len(&self) -> usize {
        self.num_samples
    }

    /// Whether the shard holds no samples.
    pub fn is_empty(&self) -> bool {
        self.num_samples == 0
    }

    /// Size of the tar file this index describes.
    pub fn tar_bytes(&self) -> u64 {
        self.tar_bytes
    }

    /// Entry `i`. Panics if `i >= len()`.
    pub fn entry(&self, i: usize) -> IndexEntry {
        assert!(
            i < self.num_samples,
            "index entry {i} of {}",
            self.num_samples
        );
        let at = HEADER_BYTES + i * ENTRY_BYTES;
        let b = &self.bytes[at..at + ENTRY_BYTES];
        IndexEntry {
            offset: u64_at(b, 0),
            len: u32_at(b, 8),
            label: u32_at(b, 12),
            key_offset: u32_at(b, 16),
            key_len: u32_at(b, 20),
            crc32: u32_at(b, 24),
        }
    }

    /// Key of sample `i`. Panics if `i >= len()`.
    pub fn key(&self, i: usize) -> &'a str {
        let e = self.entry(i);
        let keys = self.key_table();
        let bytes = &keys[e.key_offset as usize..(e.key_offset + e.key_len) as usize];
        // Checked in `parse`.
        std::str::from_utf8(bytes).expect("key checked as UTF-8 in ShardIndex::parse")
    }

    fn key_table(&self) -> &'a [u8] {
        &self.bytes[HEADER_BYTES + self.num_samples * ENTRY_BYTES..]
    }
}

/// Serialises an index: the inverse of [`ShardIndex::parse`].
pub fn encode(entries: &[IndexEntry], keys: &[u8], tar_bytes: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + entries.len() * ENTRY_BYTES + keys.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(ENTRY_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&tar_bytes.to_le_bytes());
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    out.resize(HEADER_BYTES, 0);
    for e in entries {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.label.to_le_bytes());
        out.extend_from_slice(&e.key_offset.to_le_bytes());
        out.extend_from_slice(&e.key_len.to_le_bytes());
        out.extend_from_slice(&e.crc32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out.extend_from_slice(keys);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_index() -> Vec<u8> {
        let entries = [
            IndexEntry {
                offset: 512,
                len: 10,
                label: 3,
                key_offset: 0,
                key_len: 1,
                crc32: 7,
            },
            IndexEntry {
                offset: 2048,
                len: 600,
                label: 0,
                key_offset: 1,
                key_len: 2,
                crc32: 9,
            },
        ];
        encode(&entries, b"abc", 2048 + 1024 + 1024)
    }

    #[test]
    fn round_trip() {
        let bytes = sample_index();
        let p = Path::new("x.idx");
        let idx = ShardIndex::parse(&bytes, p, Path::new("x.tar")).unwrap();
        assert_eq!(idx.len(), 2);
        assert_eq!(idx.key(0), "a");
        assert_eq!(idx.key(1), "bc");
        assert_eq!(idx.entry(1).len, 600);
        assert_eq!(idx.entry(0).label, 3);
    }

    #[test]
    fn errors_name_the_problem() {
        let p = Path::new("x.idx");
        let t = Path::new("x.tar");
        let mut bytes = sample_index();
        bytes[0] = b'X';
        let e = ShardIndex::parse(&bytes, p, t).unwrap_err().to_string();
        assert!(e.contains("expected magic \"SHRDIDX\\0\""), "{e}");

        let mut bytes = sample_index();
        bytes[8] = 9;
        let e = ShardIndex::parse(&bytes, p, t).unwrap_err().to_string();
        assert_eq!(
            e,
            "x.idx: index format version 9, this reader supports version 1"
        );

        let bytes = sample_index();
        let e = ShardIndex::parse(&bytes[..bytes.len() - 1], p, t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated index?"), "{e}");

        // Second sample ends at 2648; a tar of 3000 bytes has data up to 1976 only.
        let mut bytes = sample_index();
        bytes[24..32].copy_from_slice(&3000u64.to_le_bytes());
        let e = ShardIndex::parse(&bytes, p, t).unwrap_err().to_string();
        assert_eq!(
            e,
            "x.tar: sample 1 (key \"bc\") spans bytes 2048..2648 but the shard's data ends at 1976"
        );

        // An offset near u64::MAX: the end overflowed (a fuzzing finding).
        let mut bytes = sample_index();
        bytes[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = ShardIndex::parse(&bytes, p, t).unwrap_err().to_string();
        assert_eq!(
            e,
            "x.tar: sample 0 (key \"a\") spans bytes 18446744073709551615..18446744073709551625 but the shard's data ends at 3072"
        );
    }
}
