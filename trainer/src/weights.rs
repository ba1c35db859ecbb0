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
        return read_pth(path, device);
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

/// The pickled object of a `torch.save` archive (its `*/data.pkl`), and the archive's folder.
fn pth_object(path: &Path) -> Result<(Object, PathBuf)> {
    let format_err = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| format_err(format!("reading the zip archive: {e}")))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| format_err(format!("reading the zip archive: {e}")))?;
    let pkl = names
        .into_iter()
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| {
            format_err("a zip without data.pkl: expected a torch.save archive".into())
        })?;
    let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let entry = zip
        .by_name(&pkl)
        .map_err(|e| format_err(format!("{pkl}: {e}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(entry))
        .map_err(|e| format_err(format!("{pkl}: unpickling: {e}")))?;
    let obj = stack
        .finalize()
        .map_err(|e| format_err(format!("{pkl}: unpickling: {e}")))?;
    Ok((obj, dir))
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
