use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or writing shards. Each variant names the file, and
/// where it applies the sample key and byte offset, with what was expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a file.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (in the message, so not repeated as a source).
        error: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("{}: not a valid manifest: {error}", path.display())]
    ManifestParse {
        /// The manifest file.
        path: PathBuf,
        /// The parse error (in the message, so not repeated as a source).
        error: serde_json::Error,
    },
    /// The manifest was written by an incompatible version of the format.
    #[error(
        "{}: manifest format version {found}, this reader supports version {supported} (re-run shard-imagenet with this version)",
        path.display()
    )]
    ManifestVersion {
        /// The manifest file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// The version this code reads.
        supported: u32,
    },
    /// The manifest parses but its contents are inconsistent.
    #[error("{}: {reason}", path.display())]
    ManifestInvalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The requested split is not in the manifest.
    #[error("no split {name:?} in the data set (it has: {})", known.join(", "))]
    UnknownSplit {
        /// The requested split.
        name: String,
        /// The splits the manifest lists.
        known: Vec<String>,
    },
    /// A shard's size differs from the manifest's (usually a truncated copy).
    #[error(
        "{}: shard is {found} bytes, the manifest says {expected}{}",
        shard.display(),
        if found < expected { " (truncated shard?)" } else { "" }
    )]
    ShardSize {
        /// The shard file.
        shard: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
    /// An index file does not start with the index magic.
    #[error(
        "{}: not a shard index: expected magic {:?}, found {:?}",
        path.display(),
        String::from_utf8_lossy(crate::index::MAGIC),
        String::from_utf8_lossy(found)
    )]
    IndexMagic {
        /// The index file.
        path: PathBuf,
        /// The first bytes of the file.
        found: Vec<u8>,
    },
    /// An index file has an unsupported version.
    #[error(
        "{}: index format version {found}, this reader supports version {supported}",
        path.display()
    )]
    IndexVersion {
        /// The index file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// An index file is malformed.
    #[error("{}: corrupt index: {reason}", path.display())]
    IndexCorrupt {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An index and the manifest disagree.
    #[error("{}: {field} is {index} in the index but {manifest} in the manifest", path.display())]
    IndexMismatch {
        /// The index file.
        path: PathBuf,
        /// The field that differs.
        field: &'static str,
        /// Value in the manifest.
        manifest: u64,
        /// Value in the index.
        index: u64,
    },
    /// An index entry points outside the shard's data.
    #[error(
        "{}: sample {sample} (key {key:?}) spans bytes {offset}..{} but the shard's data ends at {data_end}",
        shard.display(),
        u128::from(*offset) + u128::from(*len)
    )]
    SamplePastEnd {
        /// The shard file.
        shard: PathBuf,
        /// Position of the sample in its shard.
        sample: u64,
        /// The sample key.
        key: String,
        /// Byte offset of the image data.
        offset: u64,
        /// Length of the image data.
        len: u64,
        /// End of the tar data (before the end-of-archive blocks).
        data_end: u64,
    },
    /// A label is not a valid class index.
    #[error(
        "{}: sample {sample} (key {key:?}) has label {label}, but the data set has {num_classes} classes",
        shard.display()
    )]
    LabelOutOfRange {
        /// The shard file.
        shard: PathBuf,
        /// Position of the sample in its shard.
        sample: u64,
        /// The sample key.
        key: String,
        /// The label found.
        label: u32,
        /// Number of classes in the manifest.
        num_classes: usize,
    },
    /// A global sample index beyond the split's end.
    #[error("sample index {index} is out of range: split {split:?} has {len} samples")]
    SampleOutOfRange {
        /// The split.
        split: String,
        /// The requested index.
        index: u64,
        /// Number of samples in the split.
        len: u64,
    },
    /// A sample's bytes do not match the CRC-32 recorded in the index.
    #[error(
        "{}: sample {key:?} at byte offset {offset}: CRC-32 {found:08x}, the index says {expected:08x} (corrupt shard)",
        shard.display()
    )]
    Checksum {
        /// The shard file.
        shard: PathBuf,
        /// The sample key.
        key: String,
        /// Byte offset of the image data.
        offset: u64,
        /// CRC-32 in the index.
        expected: u32,
        /// CRC-32 of the bytes.
        found: u32,
    },
    /// A key that cannot be written as a WebDataset key.
    #[error("invalid sample key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}
