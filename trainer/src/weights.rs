//! Weight files with timm's tensor names: safetensors (what `train` writes, and timm's
//! `.safetensors` releases) and PyTorch's `.pth` (`torch.save` zip archives, what timm's
//! ResNet-strikes-back release files are).
//!
//! A `.pth` holds the state_dict bare (timm's released weights), or under `state_dict` (timm's
//! `train.py` checkpoints) or `model` (DeiT-style checkpoints); the first of these with tensors is
//! read. Keys all starting with `module.` (a DistributedDataParallel model's state_dict) lose the
//! prefix. Entries that are not tensors (`_metadata`, `epoch`, ...) are left out.
//!
//! The format is told from the file's first bytes, not its name. PyTorch's legacy format (before
//! 1.6, not a zip) is refused with the way to convert it.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{Device, Tensor};

/// Errors of weight-file reading; each names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a weight file this reader understands.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was found and what was expected.
        message: String,
    },
    /// One tensor could not be read.
    #[error("{path}: tensor {key:?}: {message}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's key (as in the file).
        key: String,
        /// What went wrong.
        message: String,
    },
}

type Result<T> = std::result::Result<T, WeightsError>;

/// How a weight file is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// safetensors.
    Safetensors,
    /// A `torch.save` zip archive.
    Pth,
}

/// The tensors of a weight file.
#[derive(Debug)]
pub struct WeightFile {
    /// How it was stored.
    pub format: WeightFormat,
    /// Where the state_dict sat in a `.pth` (`None`: at the top level).
    pub key: Option<&'static str>,
    /// Whether a `module.` prefix was taken off every key.
    pub stripped_module_prefix: bool,
    /// Tensors by key, as stored (dtype included), on the requested device.
    pub tensors: HashMap<String, Tensor>,
}

/// Keys under which a `.pth` may hold the state_dict, tried in order after the top level.
pub const PTH_STATE_DICT_KEYS: [&str; 2] = ["state_dict", "model"];

/// Reads every tensor of `path` onto `device`.
pub fn read(path: &Path, device: &Device) -> Result<WeightFile> {
    let mut magic = [0u8; 9];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let magic = &magic[..n];
    let format_err = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        message,
    };
    if magic.starts_with(b"PK\x03\x04") {
        // candle's pickle reader panics on some malformed files (an index out of bounds on a
        // short tuple, a shift overflow): those become errors here (fuzzing findings,
        // fuzz/regressions/weights/). `check_pickles` has already refused the inputs that
        // would make it allocate without bound, which no unwinding could undo.
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_pth(path, device)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(format_err(format!(
                    "malformed torch.save archive: the pickle reader failed ({what})"
                )))
            });
    }
    if magic.first() == Some(&0x80) || magic.starts_with(&[0x8a, 0x0a]) {
        return Err(format_err(
            "PyTorch's legacy (pre-1.6, not zip) format: re-save it with a recent torch \
             (torch.save(torch.load(path), new_path)), or as safetensors"
                .into(),
        ));
    }
    // safetensors: an 8-byte little-endian header length, then a JSON header.
    if magic.len() == 9 && magic[8] == b'{' {
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| format_err(format!("reading safetensors: {e}")))?;
        return Ok(WeightFile {
            format: WeightFormat::Safetensors,
            key: None,
            stripped_module_prefix: false,
            tensors: strip_module_prefix(tensors).0,
        });
    }
    Err(format_err(format!(
        "expected weights as safetensors or a PyTorch .pth (zip), found a file starting with {magic:02x?}"
    )))
}

/// `tensors` without a `module.` prefix, if every key has one.
fn strip_module_prefix(tensors: HashMap<String, Tensor>) -> (HashMap<String, Tensor>, bool) {
    const PREFIX: &str = "module.";
    if tensors.is_empty() || !tensors.keys().all(|k| k.starts_with(PREFIX)) {
        return (tensors, false);
    }
    let stripped = tensors
        .into_iter()
        .map(|(k, v)| (k[PREFIX.len()..].to_string(), v))
        .collect();
    (stripped, true)
}

type Zip = zip::ZipArchive<std::io::BufReader<std::fs::File>>;

/// The zip archive of a `torch.save` file, and the file's length.
fn open_zip(path: &Path) -> Result<(Zip, u64)> {
    let file = std::fs::File::open(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| WeightsError::Format {
            path: path.to_path_buf(),
            message: format!("reading the zip archive: {e}"),
        })?;
    Ok((zip, len))
}

/// The pickled object of a `torch.save` archive (its `*/data.pkl`), and the archive's folder.
fn pth_object(path: &Path) -> Result<(Object, PathBuf)> {
    let format_err = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (mut zip, _) = open_zip(path)?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| format_err(format!("reading the zip archive: {e}")))?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .cloned()
        .ok_or_else(|| {
            format_err("a zip without data.pkl: expected a torch.save archive".into())
        })?;
    let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    // candle's PthTensors reads the archive again and takes the first name ending in
    // "data.pkl": check all of them.
    let mut checked = None;
    for name in names.iter().filter(|n| n.ends_with("data.pkl")) {
        let mut bytes = Vec::new();
        zip.by_name(name)
            .map_err(|e| format_err(format!("{name}: {e}")))?
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format_err(format!("{name}: {e}")))?;
        if bytes.len() as u64 > MAX_PICKLE_BYTES {
            return Err(format_err(format!(
                "{name}: more than {MAX_PICKLE_BYTES} bytes, the limit for a state_dict's pickle"
            )));
        }
        check_pickle(&bytes).map_err(|e| format_err(format!("{name}: {e}")))?;
        if *name == pkl {
            checked = Some(bytes);
        }
    }
    let bytes = checked.expect("the chosen data.pkl ends in data.pkl");
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format_err(format!("{pkl}: unpickling: {e}")))?;
    let obj = stack
        .finalize()
        .map_err(|e| format_err(format!("{pkl}: unpickling: {e}")))?;
    Ok((obj, dir))
}

/// The largest `data.pkl` read: 256 MiB (a ResNet-50 state_dict's is 30 KB; its size grows
/// with the number of tensors, not their sizes).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Walks the opcodes of a pickle that candle's reader understands and refuses the arguments
/// it would trust: a string length beyond the end of the pickle (candle allocates the claimed
/// length first, up to 4 GiB: a fuzzing finding) and a LONG1 of more than 8 bytes (an i64
/// shift overflow). Stops at the first opcode candle does not know, where candle fails too.
fn check_pickle(b: &[u8]) -> std::result::Result<(), String> {
    let mut pos = 0usize;
    let arg = |pos: usize, n: usize| -> std::result::Result<&[u8], String> {
        b.get(pos..pos + n)
            .ok_or_else(|| format!("pickle ends inside an opcode's argument at byte {pos}"))
    };
    while let Some(&op) = b.get(pos) {
        pos += 1;
        let n = match op {
            b'.' => return Ok(()),
            0x80 | b'q' | b'K' | b'h' => 1,
            b'M' => 2,
            b'r' | b'J' | b'j' => 4,
            b'G' => 8,
            b'X' => {
                let len = u32::from_le_bytes(arg(pos, 4)?.try_into().expect("4 bytes")) as usize;
                if len > b.len() - pos - 4 {
                    return Err(format!(
                        "a string at byte {} claims {len} bytes, {} remain",
                        pos - 1,
                        b.len() - pos - 4
                    ));
                }
                4 + len
            }
            0x8a => {
                let len = arg(pos, 1)?[0] as usize;
                if len > 8 {
                    return Err(format!(
                        "an integer of {len} bytes at byte {}, expected at most 8",
                        pos - 1
                    ));
                }
                1 + len
            }
            b'c' => {
                // Module and class names, each ending at a newline (or the pickle's end).
                let mut end = pos;
                for _ in 0..2 {
                    end = b[end..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(b.len(), |i| end + i + 1);
                }
                end - pos
            }
            b')'
            | b'R'
            | b'('
            | b't'
            | b'Q'
            | b'N'
            | 0x85..=0x89
            | b's'
            | b'u'
            | b'}'
            | b'd'
            | b'b'
            | 0x81
            | b']'
            | b'a'
            | b'e' => 0,
            _ => return Ok(()),
        };
        arg(pos, n)?;
        pos += n;
    }
    Ok(())
}

/// Checks that every tensor's bytes (elements times dtype size, from the pickle) fit in its
/// storage's zip entry, before candle allocates them (a fuzzing finding: a small file claiming
/// a 4 GB tensor). Entry sizes are bounded by the file's length times deflate's largest ratio.
fn check_tensor_sizes(path: &Path, infos: &[candle_core::pickle::TensorInfo]) -> Result<()> {
    let (mut zip, file_len) = open_zip(path)?;
    for info in infos {
        let tensor_err = |message: String| WeightsError::Tensor {
            path: path.to_path_buf(),
            key: info.name.clone(),
            message,
        };
        let elements =
            (info.layout.shape().dims().iter()).fold(1u128, |n, &d| n.saturating_mul(d as u128));
        let need = (info.layout.start_offset() as u128 + elements)
            .saturating_mul(info.dtype.size_in_bytes() as u128);
        let have = match zip.by_name(&info.path) {
            Ok(entry) => entry.size().min(file_len.saturating_mul(1032)),
            Err(e) => return Err(tensor_err(format!("storage {}: {e}", info.path))),
        };
        if need > have as u128 {
            return Err(tensor_err(format!(
                "shape {:?} ({} bytes from element {}) does not fit its storage {} ({have} bytes)",
                info.layout.shape().dims(),
                need,
                info.layout.start_offset(),
                info.path
            )));
        }
    }
    Ok(())
}

/// The dictionary's entries that are tensors (key, info), and those that look like tensors but
/// cannot be read (key, reason).
type TensorEntries = (Vec<candle_core::pickle::TensorInfo>, Vec<(String, String)>);

fn tensor_entries(dict: &[(Object, Object)], dir: &Path) -> TensorEntries {
    let mut infos = Vec::new();
    let mut bad = Vec::new();
    for (k, v) in dict {
        let Object::Unicode(key) = k else { continue };
        match v.clone().into_tensor_info(k.clone(), dir) {
            Ok(Some(info)) => infos.push(info),
            Ok(None) => {}
            Err(e) => bad.push((key.clone(), e.to_string())),
        }
    }
    (infos, bad)
}

fn read_pth(path: &Path, device: &Device) -> Result<WeightFile> {
    let format_err = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (obj, dir) = pth_object(path)?;
    let Object::Dict(top) = obj else {
        return Err(format_err(
            "the pickled object is not a dict: expected a state_dict, or a dict holding one \
             under \"state_dict\" or \"model\" (a pickled nn.Module cannot be read: save its \
             state_dict())"
                .into(),
        ));
    };
    let mut chosen = None;
    let (infos, bad) = tensor_entries(&top, &dir);
    if !infos.is_empty() || !bad.is_empty() {
        chosen = Some((None, infos, bad));
    } else {
        for key in PTH_STATE_DICT_KEYS {
            let inner = top.iter().find_map(|(k, v)| match (k, v) {
                (Object::Unicode(k), Object::Dict(d)) if k == key => Some(d),
                _ => None,
            });
            if let Some(inner) = inner {
                let (infos, bad) = tensor_entries(inner, &dir);
                if !infos.is_empty() || !bad.is_empty() {
                    chosen = Some((Some(key), infos, bad));
                    break;
                }
            }
        }
    }
    let Some((key, infos, bad)) = chosen else {
        let keys: Vec<String> = top
            .iter()
            .filter_map(|(k, _)| match k {
                Object::Unicode(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        return Err(format_err(format!(
            "no tensors at the top level nor under {PTH_STATE_DICT_KEYS:?} (top-level keys: {keys:?})"
        )));
    };
    if let Some((k, message)) = bad.into_iter().next() {
        return Err(WeightsError::Tensor {
            path: path.to_path_buf(),
            key: k,
            message: format!("cannot be read: {message}"),
        });
    }
    check_tensor_sizes(path, &infos)?;
    let pth = PthTensors::new(path, key).map_err(|e| format_err(e.to_string()))?;
    let mut tensors = HashMap::with_capacity(infos.len());
    for info in infos {
        let tensor_err = |message: String| WeightsError::Tensor {
            path: path.to_path_buf(),
            key: info.name.clone(),
            message,
        };
        let t = pth
            .get(&info.name)
            .map_err(|e| tensor_err(e.to_string()))?
            .ok_or_else(|| tensor_err("listed but not found by the reader".into()))?;
        let t = t.to_device(device).map_err(|e| tensor_err(e.to_string()))?;
        tensors.insert(info.name.clone(), t);
    }
    let (tensors, stripped_module_prefix) = strip_module_prefix(tensors);
    Ok(WeightFile {
        format: WeightFormat::Pth,
        key,
        stripped_module_prefix,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_legacy_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("w.bin");
        std::fs::write(&junk, b"hello world").unwrap();
        let err = read(&junk, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("w.bin") && err.contains("expected weights as safetensors"),
            "{err}"
        );
        let legacy = dir.path().join("old.pth");
        std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a, 0, 0, 0, 0, 0]).unwrap();
        let err = read(&legacy, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("legacy"), "{err}");
        let missing = dir.path().join("none.pth");
        let err = read(&missing, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("none.pth"), "{err}");
    }

    #[test]
    fn pickles_that_candle_would_trust_too_far_are_refused() {
        // BINUNICODE claiming 2 GB (a fuzzing finding: candle allocated it before reading).
        let e = check_pickle(b"\x80\x02X\x09\x00\x00\x7fabc.").unwrap_err();
        assert_eq!(e, "a string at byte 2 claims 2130706441 bytes, 4 remain");
        let e = check_pickle(b"\x8a\x09123456789.").unwrap_err();
        assert_eq!(e, "an integer of 9 bytes at byte 0, expected at most 8");
        let e = check_pickle(b"\x80").unwrap_err();
        assert_eq!(e, "pickle ends inside an opcode's argument at byte 1");
        check_pickle(b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01ccollections\nOrderedDict\nu.")
            .unwrap();
        check_pickle(b"ctorch").unwrap();
    }

    #[test]
    fn a_module_prefix_is_taken_off_only_when_every_key_has_it() {
        let t = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
        let all: HashMap<String, Tensor> = [("module.a", &t), ("module.b.c", &t)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let (out, stripped) = strip_module_prefix(all);
        assert!(stripped);
        assert!(out.contains_key("a") && out.contains_key("b.c"));
        let some: HashMap<String, Tensor> = [("module.a", &t), ("b", &t)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let (out, stripped) = strip_module_prefix(some);
        assert!(!stripped && out.contains_key("module.a"));
    }
}
