//! Writing one shard: a tar file and its index, under temporary names until complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::index::{self, IndexEntry};
use crate::key::{check_key, IMAGE_SUFFIX, LABEL_SUFFIX};
use crate::manifest::tmp_path;

const BLOCK: u64 = 512;

/// Writes samples into `<name>.tar.tmp` and `<name>.idx.tmp`; [`ShardWriter::finish`] syncs both
/// and renames them to `<name>.tar` and `<name>.idx` (index first), so a shard whose writing was
/// interrupted never appears under its final name. Output depends only on the samples appended:
/// tar headers carry mode 0644, owner 0 and mtime 0.
///
/// The tar's SHA-256 is computed on a helper thread that receives the bytes in file order
/// (image data by move, headers batched), so hashing overlaps writing instead of doubling the
/// writer's work.
pub struct ShardWriter {
    tar_path: PathBuf,
    index_path: PathBuf,
    tar_tmp: PathBuf,
    out: BufWriter<File>,
    hasher: Hasher,
    pos: u64,
    entries: Vec<IndexEntry>,
    keys: Vec<u8>,
}

/// SHA-256 over a stream of owned buffers, on its own thread.
struct Hasher {
    /// Small writes (headers, padding) not yet sent.
    pending: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<Sha256>>,
}

impl Hasher {
    fn new() -> Self {
        // Bounded, so a slow hasher holds back the writer instead of buffering a whole shard.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(256);
        let thread = std::thread::Builder::new()
            .name("shard-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for buf in rx {
                    h.update(&buf);
                }
                h
            })
            .expect("spawning the hashing thread");
        Hasher {
            pending: Vec::new(),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&mut self, buf: Vec<u8>) {
        // The thread only ends when `tx` is dropped, so a send failure means it panicked;
        // `finish` reports that.
        if let Some(tx) = &self.tx {
            let _ = tx.send(buf);
        }
    }

    fn small(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn owned(&mut self, buf: Vec<u8>) {
        if !self.pending.is_empty() {
            let p = std::mem::take(&mut self.pending);
            self.send(p);
        }
        self.send(buf);
    }

    fn finish(mut self) -> String {
        let p = std::mem::take(&mut self.pending);
        self.send(p);
        drop(self.tx.take());
        let h = self
            .thread
            .take()
            .expect("hasher finished once")
            .join()
            .expect("the hashing thread panicked");
        hex(&h.finalize())
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What [`ShardWriter::finish`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenShard {
    /// The tar file.
    pub tar_path: PathBuf,
    /// The index file.
    pub index_path: PathBuf,
    /// Samples written.
    pub num_samples: u64,
    /// Size of the tar file.
    pub tar_bytes: u64,
    /// SHA-256 of the tar file, lowercase hex.
    pub tar_sha256: String,
    /// Size of the index file.
    pub index_bytes: u64,
    /// SHA-256 of the index file, lowercase hex.
    pub index_sha256: String,
}

/// A member's contents: small ones are copied, image data is moved to the hashing thread.
enum Member<'a> {
    Small(&'a [u8]),
    Owned(Vec<u8>),
}

/// The index file that belongs to tar file `tar_path`: the same name with extension `.idx`.
pub fn index_path_for(tar_path: &Path) -> PathBuf {
    tar_path.with_extension("idx")
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ShardWriter {
    /// Starts shard `tar_path` (which should end in `.tar`); its index goes beside it.
    pub fn create(tar_path: &Path) -> Result<Self> {
        let tar_tmp = tmp_path(tar_path);
        let file = File::create(&tar_tmp).map_err(|e| Error::io(&tar_tmp, e))?;
        Ok(ShardWriter {
            tar_path: tar_path.to_owned(),
            index_path: index_path_for(tar_path),
            tar_tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: Hasher::new(),
            pos: 0,
            entries: Vec::new(),
            keys: Vec::new(),
        })
    }

    /// Bytes written to the tar so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Samples appended so far.
    pub fn num_samples(&self) -> usize {
        self.entries.len()
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.tar_tmp, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_raw(bytes)?;
        self.hasher.small(bytes);
        Ok(())
    }

    fn write_member(&mut self, name: &str, data: Member<'_>) -> Result<u64> {
        let mut header = tar::Header::new_ustar();
        header
            .set_path(name)
            .map_err(|e| Error::io(&self.tar_tmp, e))?;
        header.set_size(match &data {
            Member::Small(b) => b.len(),
            Member::Owned(b) => b.len(),
        } as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        self.write(header.as_bytes())?;
        let data_offset = self.pos;
        let len = match data {
            Member::Small(bytes) => {
                self.write(bytes)?;
                bytes.len()
            }
            Member::Owned(buf) => {
                self.write_raw(&buf)?;
                let len = buf.len();
                self.hasher.owned(buf);
                len
            }
        };
        let pad = (BLOCK - len as u64 % BLOCK) % BLOCK;
        self.write(&[0u8; BLOCK as usize][..pad as usize])?;
        Ok(data_offset)
    }

    /// Appends a sample: `<key>.jpg` holding `image` unchanged, then `<key>.cls` holding the
    /// label in ASCII decimal.
    pub fn append(&mut self, key: &str, image: &[u8], label: u32) -> Result<()> {
        self.append_owned(key, image.to_vec(), label)
    }

    /// Like [`ShardWriter::append`], taking ownership of the image bytes so that they can be
    /// hashed on the helper thread without a copy.
    pub fn append_owned(&mut self, key: &str, image: Vec<u8>, label: u32) -> Result<()> {
        check_key(key).map_err(|reason| Error::InvalidKey {
            key: key.to_owned(),
            reason,
        })?;
        let len = u32::try_from(image.len()).map_err(|_| Error::InvalidKey {
            key: key.to_owned(),
            reason: format!(
                "image is {} bytes, at most 4 GiB fit the index",
                image.len()
            ),
        })?;
        let crc32 = crc32fast::hash(&image);
        let offset = self.write_member(&format!("{key}{IMAGE_SUFFIX}"), Member::Owned(image))?;
        self.write_member(
            &format!("{key}{LABEL_SUFFIX}"),
            Member::Small(label.to_string().as_bytes()),
        )?;
        self.entries.push(IndexEntry {
            offset,
            len,
            label,
            key_offset: self.keys.len() as u32,
            key_len: key.len() as u32,
            crc32,
        });
        self.keys.extend_from_slice(key.as_bytes());
        Ok(())
    }

    /// Ends the archive, syncs the files to disk, and renames the index and then the tar to
    /// their final names.
    pub fn finish(mut self) -> Result<WrittenShard> {
        self.write(&[0u8; 2 * BLOCK as usize])?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tar_tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tar_tmp, e))?;
        drop(file);

        let index_bytes = index::encode(&self.entries, &self.keys, self.pos);
        crate::manifest::write_atomically(&self.index_path, &index_bytes)?;
        std::fs::rename(&self.tar_tmp, &self.tar_path).map_err(|e| Error::io(&self.tar_path, e))?;
        Ok(WrittenShard {
            tar_path: self.tar_path,
            index_path: self.index_path,
            num_samples: self.entries.len() as u64,
            tar_bytes: self.pos,
            tar_sha256: self.hasher.finish(),
            index_bytes: index_bytes.len() as u64,
            index_sha256: hex(&Sha256::digest(&index_bytes)),
        })
    }
}
