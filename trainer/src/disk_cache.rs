//! A small on-disk cache for what every CUDA process would otherwise redo at start-up: the
//! kernels compiled for the GPU's architecture (`cuda::kernels`) and the cuDNN algorithms found
//! per convolution shape (`cuda::conv`). Plain Rust (no CUDA), so its rules are tested in every
//! build.
//!
//! Where: `$RSB_CACHE_DIR` if set (an empty value or `off` turns the cache off), else
//! `$XDG_CACHE_HOME/rsb`, else `$HOME/.cache/rsb`. Entries are keyed by everything that decides
//! their content (source hash, architecture, library and driver versions, GPU), so a stale entry
//! is never read for another setup; a missing, unreadable or corrupt entry is recomputed and
//! rewritten. Writes go to a temporary file that is renamed into place, so concurrent processes
//! (one per GPU) never see half a file. The cache is an optimisation only: no failure here fails
//! a run (the first one is reported once on stderr).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// A cache directory, or none (every read misses, every write is dropped).
#[derive(Clone, Debug)]
pub struct DiskCache {
    root: Option<PathBuf>,
}

impl DiskCache {
    /// The process's cache, at the location the environment gives (see the module docs).
    pub fn global() -> &'static DiskCache {
        static CACHE: OnceLock<DiskCache> = OnceLock::new();
        CACHE.get_or_init(|| DiskCache {
            root: resolve_dir(
                std::env::var_os("RSB_CACHE_DIR"),
                std::env::var_os("XDG_CACHE_HOME"),
                std::env::var_os("HOME"),
            ),
        })
    }

    /// A cache rooted at `root` (`None`: off).
    pub fn at(root: Option<PathBuf>) -> Self {
        Self { root }
    }

    /// The directory, if the cache is on.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The bytes of entry `rel` (a path under the cache directory), if present and readable.
    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.as_ref()?.join(rel)).ok()
    }

    /// Writes entry `rel` atomically (temporary file, then rename). A failure is reported once
    /// per process on stderr and otherwise ignored.
    pub fn write(&self, rel: &str, bytes: &[u8]) {
        let Some(d) = &self.root else { return };
        if let Err(e) = write_atomic(&d.join(rel), bytes) {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "warning: CUDA start-up cache {}: {e} (set RSB_CACHE_DIR to a writable \
                     directory, or to `off`)",
                    d.display()
                );
            }
        }
    }
}

/// The rule of [`DiskCache::global`], from `RSB_CACHE_DIR`, `XDG_CACHE_HOME` and `HOME`.
pub fn resolve_dir(
    rsb: Option<std::ffi::OsString>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if let Some(v) = rsb {
        if v.is_empty() || v == "off" {
            return None;
        }
        return Some(PathBuf::from(v));
    }
    if let Some(x) = xdg.filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("rsb"));
    }
    home.filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("rsb"))
}

/// `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A file-name-safe form of `s`: ASCII letters, digits, `-`, `.` and `_` kept, the rest `_`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The first 16 hex digits of the SHA-256 of `parts` (each length-prefixed).
pub fn hash_hex(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key-value table kept as one JSON file of a [`DiskCache`], read once and rewritten whole
/// after each insertion. A file of another format or version reads as an empty table.
#[derive(Debug)]
pub struct JsonTable<V> {
    cache: DiskCache,
    rel: String,
    entries: BTreeMap<String, V>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TableFile<V> {
    format: String,
    version: u32,
    entries: BTreeMap<String, V>,
}

const TABLE_FORMAT: &str = "rsb-cache-table";
const TABLE_VERSION: u32 = 1;

impl<V: serde::Serialize + serde::de::DeserializeOwned + Clone> JsonTable<V> {
    /// The table stored at `rel` in `cache`, or an empty one.
    pub fn load(cache: &DiskCache, rel: impl Into<String>) -> Self {
        let rel = rel.into();
        let entries = Self::stored(cache, &rel).unwrap_or_default();
        Self {
            cache: cache.clone(),
            rel,
            entries,
        }
    }

    fn stored(cache: &DiskCache, rel: &str) -> Option<BTreeMap<String, V>> {
        let f: TableFile<V> = serde_json::from_slice(&cache.read(rel)?).ok()?;
        (f.format == TABLE_FORMAT && f.version == TABLE_VERSION).then_some(f.entries)
    }

    /// The value of `key`, if stored.
    pub fn get(&self, key: &str) -> Option<V> {
        self.entries.get(key).cloned()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets `key` and rewrites the file. Entries that other processes wrote since this table was
    /// read are merged in first, so concurrent writers lose at most what races the same moment.
    pub fn insert(&mut self, key: String, value: V) {
        for (k, v) in Self::stored(&self.cache, &self.rel).unwrap_or_default() {
            self.entries.entry(k).or_insert(v);
        }
        self.entries.insert(key, value);
        let file = TableFile {
            format: TABLE_FORMAT.to_string(),
            version: TABLE_VERSION,
            entries: self.entries.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec_pretty(&file) {
            self.cache.write(&self.rel, &bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_rule() {
        let s = |v: &str| Some(std::ffi::OsString::from(v));
        assert_eq!(resolve_dir(s("/c"), s("/x"), s("/h")), Some("/c".into()));
        assert_eq!(resolve_dir(s("off"), s("/x"), s("/h")), None);
        assert_eq!(resolve_dir(s(""), s("/x"), s("/h")), None);
        assert_eq!(resolve_dir(None, s("/x"), s("/h")), Some("/x/rsb".into()));
        assert_eq!(
            resolve_dir(None, s(""), s("/h")),
            Some("/h/.cache/rsb".into())
        );
        assert_eq!(resolve_dir(None, None, None), None);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a/b/entry.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("entry.bin")]);
    }

    #[test]
    fn names_and_hashes() {
        assert_eq!(sanitize("NVIDIA H100 80GB HBM3"), "NVIDIA_H100_80GB_HBM3");
        assert_eq!(hash_hex(&[b"ab", b"c"]).len(), 16);
        assert_ne!(hash_hex(&[b"ab", b"c"]), hash_hex(&[b"a", b"bc"]));
    }

    #[test]
    fn tables_persist_merge_and_survive_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::at(Some(tmp.path().to_path_buf()));
        let mut a: JsonTable<[u32; 2]> = JsonTable::load(&cache, "t/algos.json");
        assert!(a.is_empty());
        // Two processes: b is read before a writes; b's write keeps a's entry.
        let mut b: JsonTable<[u32; 2]> = JsonTable::load(&cache, "t/algos.json");
        a.insert("x".into(), [1, 2]);
        b.insert("y".into(), [3, 4]);
        let c: JsonTable<[u32; 2]> = JsonTable::load(&cache, "t/algos.json");
        assert_eq!(
            (c.get("x"), c.get("y"), c.len()),
            (Some([1, 2]), Some([3, 4]), 2)
        );
        // A corrupt file reads as empty and is rewritten by the next insertion.
        std::fs::write(tmp.path().join("t/algos.json"), b"{not json").unwrap();
        let mut d: JsonTable<[u32; 2]> = JsonTable::load(&cache, "t/algos.json");
        assert!(d.is_empty());
        d.insert("z".into(), [5, 6]);
        let e: JsonTable<[u32; 2]> = JsonTable::load(&cache, "t/algos.json");
        assert_eq!((e.get("z"), e.len()), (Some([5, 6]), 1));
        // Off: nothing is read or written.
        let off = DiskCache::at(None);
        let mut t: JsonTable<[u32; 2]> = JsonTable::load(&off, "t/algos.json");
        t.insert("w".into(), [0, 0]);
        assert!(JsonTable::<[u32; 2]>::load(&off, "t/algos.json").is_empty());
    }
}
