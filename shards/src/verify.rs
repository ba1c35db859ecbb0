//! Full verification of a shard set: manifest, every index, every checksum, and the tar
//! structure, reporting every problem with its location instead of stopping at the first.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::index::ShardIndex;
use crate::key::{IMAGE_SUFFIX, LABEL_SUFFIX};
use crate::manifest::{Manifest, ShardInfo};
use crate::reader::check_index;
use crate::writer::hex;

/// One thing found wrong, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// File, and sample or byte offset where it applies.
    pub location: String,
    /// What is wrong: expected versus found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Shards checked.
    pub num_shards: usize,
    /// Samples checked.
    pub num_samples: u64,
    /// Bytes read (tars and indexes).
    pub num_bytes: u64,
    /// Everything found wrong; empty when the set is intact.
    pub problems: Vec<Problem>,
}

/// Verifies the shard set in `root` on `threads` threads, calling `progress` with the number of
/// bytes read as it goes. Returns `Err` only when the manifest itself cannot be read or checked;
/// every other problem is listed in the report.
pub fn verify(
    root: &Path,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<VerifyReport> {
    let manifest = Manifest::load(&root.join(crate::MANIFEST_FILE))?;
    let num_classes = manifest.classes.len();
    let mut report = VerifyReport::default();
    for (split_name, split) in &manifest.splits {
        let next = AtomicUsize::new(0);
        let mut results: Vec<(usize, ShardResult)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(info) = split.shards.get(i) else {
                                return done;
                            };
                            done.push((i, verify_shard(root, info, num_classes, progress)));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("verify worker panicked"))
                .collect()
        });
        results.sort_by_key(|(i, _)| *i);
        let mut first_seen: HashMap<String, String> = HashMap::new();
        for (i, r) in results {
            report.num_shards += 1;
            report.num_samples += r.keys.len() as u64;
            report.num_bytes += r.bytes;
            report.problems.extend(r.problems);
            for key in r.keys {
                let here = split.shards[i].tar.clone();
                if let Some(prev) = first_seen.insert(key.clone(), here.clone()) {
                    report.problems.push(Problem {
                        location: format!("{here}: sample {key:?}"),
                        message: format!("duplicate key in split {split_name:?}, also in {prev}"),
                    });
                }
            }
        }
    }
    Ok(report)
}

#[derive(Default)]
struct ShardResult {
    keys: Vec<String>,
    bytes: u64,
    problems: Vec<Problem>,
}

fn sha256_file(path: &Path, progress: &(dyn Fn(u64) + Sync)) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
        progress(n as u64);
    }
    Ok((total, hex(&h.finalize())))
}

fn verify_shard(
    root: &Path,
    info: &ShardInfo,
    num_classes: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> ShardResult {
    let mut r = ShardResult::default();
    let tar_path = root.join(&info.tar);
    let index_path = root.join(&info.index);
    let mut problem = |location: &Path, message: String| {
        r.problems.push(Problem {
            location: location.display().to_string(),
            message,
        })
    };

    // Whole-file sizes and checksums.
    for (path, bytes, sha) in [
        (&tar_path, info.tar_bytes, &info.tar_sha256),
        (&index_path, info.index_bytes, &info.index_sha256),
    ] {
        match sha256_file(path, progress) {
            Err(e) => problem(path, format!("cannot read: {e}")),
            Ok((len, digest)) => {
                r.bytes += len;
                if len != bytes {
                    let hint = if len < bytes { " (truncated?)" } else { "" };
                    problem(
                        path,
                        format!("file is {len} bytes, the manifest says {bytes}{hint}"),
                    );
                }
                if &digest != sha {
                    problem(
                        path,
                        format!("SHA-256 is {digest}, the manifest says {sha}"),
                    );
                }
            }
        }
    }
    let (Ok(tar), Ok(index)) = (std::fs::read(&tar_path), std::fs::read(&index_path)) else {
        return r;
    };

    // Index structure, counts, bounds and labels.
    if let Err(e) = check_index(&index, &index_path, &tar_path, info, num_classes) {
        r.problems.push(error_problem(e));
        // Without a trustworthy index, still walk the tar if the index parses at all.
    }
    let Ok(idx) = ShardIndex::parse(&index, &index_path, &tar_path) else {
        return r;
    };
    for i in 0..idx.len() {
        let e = idx.entry(i);
        let key = idx.key(i);
        r.keys.push(key.to_owned());
        let end = (e.offset + e.len as u64) as usize;
        if let Some(bytes) = tar.get(e.offset as usize..end) {
            let found = crc32fast::hash(bytes);
            if found != e.crc32 {
                r.problems.push(error_problem(Error::Checksum {
                    shard: tar_path.clone(),
                    key: key.to_owned(),
                    offset: e.offset,
                    expected: e.crc32,
                    found,
                }));
            }
        }
    }

    // The tar itself, read by an independent parser: members pair up with the index.
    let walked = walk_tar(&tar);
    let at = |offset: u64| format!("{}: byte {offset}", tar_path.display());
    match walked {
        Err((offset, msg)) => r.problems.push(Problem {
            location: at(offset),
            message: format!("tar structure: {msg}"),
        }),
        Ok(members) => {
            let expected = idx.len() * 2;
            if members.len() != expected {
                r.problems.push(Problem {
                    location: tar_path.display().to_string(),
                    message: format!(
                        "tar holds {} members, the index implies {expected} ({} samples x 2)",
                        members.len(),
                        idx.len()
                    ),
                });
            }
            for (i, pair) in members.chunks(2).enumerate().take(idx.len()) {
                let e = idx.entry(i);
                let key = idx.key(i);
                let image_name = format!("{key}{IMAGE_SUFFIX}");
                let label_name = format!("{key}{LABEL_SUFFIX}");
                let m = &pair[0];
                if m.name != image_name || m.offset != e.offset || m.len != e.len as u64 {
                    r.problems.push(Problem {
                        location: at(m.offset),
                        message: format!(
                            "sample {i}: expected member {image_name:?} with {} bytes at offset {}, found {:?} with {} bytes at offset {}",
                            e.len, e.offset, m.name, m.len, m.offset
                        ),
                    });
                }
                match pair.get(1) {
                    Some(c) if c.name == label_name && c.data == e.label.to_string().as_bytes() => {}
                    Some(c) => r.problems.push(Problem {
                        location: at(c.offset),
                        message: format!(
                            "sample {i}: expected member {label_name:?} holding {:?}, found {:?} holding {:?}",
                            e.label.to_string(),
                            c.name,
                            String::from_utf8_lossy(&c.data)
                        ),
                    }),
                    None => r.problems.push(Problem {
                        location: tar_path.display().to_string(),
                        message: format!("sample {i}: member {label_name:?} is missing"),
                    }),
                }
            }
        }
    }
    r
}

fn error_problem(e: Error) -> Problem {
    // Errors already start with the file name; split it off as the location.
    let text = e.to_string();
    match text.split_once(": ") {
        Some((loc, msg)) => Problem {
            location: loc.to_owned(),
            message: msg.to_owned(),
        },
        None => Problem {
            location: String::new(),
            message: text,
        },
    }
}

struct Member {
    name: String,
    offset: u64,
    len: u64,
    /// Contents, kept only for small (label) members.
    data: Vec<u8>,
}

/// Lists the tar's members with the `tar` crate, which shares no code with our writer.
fn walk_tar(bytes: &[u8]) -> std::result::Result<Vec<Member>, (u64, String)> {
    let mut archive = tar::Archive::new(bytes);
    let mut members = Vec::new();
    let entries = archive.entries().map_err(|e| (0, e.to_string()))?;
    let mut last_offset = 0;
    for entry in entries {
        let mut entry = entry.map_err(|e| (last_offset, e.to_string()))?;
        let offset = entry.raw_file_position();
        last_offset = offset;
        let len = entry.size();
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| (offset, e.to_string()))?;
        let mut data = Vec::new();
        if len <= 32 {
            entry
                .read_to_end(&mut data)
                .map_err(|e| (offset, e.to_string()))?;
        }
        members.push(Member {
            name,
            offset,
            len,
            data,
        });
    }
    Ok(members)
}
