//! Checkpoints: `RUN_DIR/checkpoints/step-N.safetensors` (every network tensor under its timm
//! name, BatchNorm running statistics included, so a checkpoint loads wherever timm weights do),
//! `step-N.optim.safetensors` (the optimizer's state tensors) and `step-N.json` ([`RunState`]),
//! plus `checkpoints/latest` naming the newest complete one.
//!
//! Every file is written under a `.tmp` name and renamed when complete, and `latest` is
//! replaced last, so an interrupted write never leaves `latest` pointing at a partial
//! checkpoint.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use loader::LoaderState;
use serde::{Deserialize, Serialize};

use crate::optim::TrainOptimizer;

/// Version of the sidecar format.
pub const FORMAT_VERSION: u32 = 1;

/// Errors of checkpoint reading and writing; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A tensor file could not be read or written, or does not match the network.
    #[error("{path}: {message}")]
    Tensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The sidecar is not valid JSON of the expected shape.
    #[error("{path}: expected a checkpoint sidecar (format {FORMAT_VERSION}): {message}")]
    Sidecar {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A weight file could not be read.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    /// There is no checkpoint to resume from.
    #[error(
        "{dir}: no checkpoint to resume from (expected a `latest` file written by a previous run)"
    )]
    NoCheckpoint {
        /// The checkpoints directory.
        dir: PathBuf,
    },
}

type Result<T> = std::result::Result<T, CheckpointError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a run stands after an optimizer update: enough to continue it exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Sidecar format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Optimizer updates done.
    pub step: u64,
    /// The epoch the next update belongs to.
    pub epoch: u64,
    /// Where the training loader continues.
    pub loader: LoaderState,
    /// Run seed (model init, loader, mixup, drop-path).
    pub seed: u64,
    /// SHA-256 of the resolved recipe's TOML text; a resume with another recipe is refused.
    pub recipe_hash: String,
    /// Weights file name, relative to the checkpoints directory.
    pub weights: String,
    /// Optimizer state file name, relative to the checkpoints directory.
    pub optimizer: String,
    /// Ranks of the run that wrote it (1 for checkpoints written before this field existed).
    #[serde(default = "one")]
    pub world_size: u32,
    /// Micro-batches per update on each of those ranks (0: not recorded; a one-rank run's
    /// `global_batch / micro_batch`).
    #[serde(default)]
    pub accum_steps: u32,
    /// The metrics window open at this checkpoint (the updates since the last metrics line), so
    /// that a resumed run writes the same metrics lines; `None` in sidecars written before this
    /// field existed (the first line after resuming one averages only the updates after it).
    #[serde(default)]
    pub metrics_window: Option<LossWindow>,
}

/// The losses of the updates since the last metrics line, as the trainer sums them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossWindow {
    /// Updates in the window.
    pub updates: u64,
    /// Their losses summed in f64 in update order, as [`f64::to_bits`]: exact, and a NaN loss
    /// survives JSON (which has no NaN).
    pub loss_sum_bits: u64,
}

impl LossWindow {
    /// The window of `updates` updates whose losses sum to `loss_sum`.
    pub fn new(updates: u64, loss_sum: f64) -> Self {
        LossWindow {
            updates,
            loss_sum_bits: loss_sum.to_bits(),
        }
    }

    /// The sum of the window's losses.
    pub fn loss_sum(&self) -> f64 {
        f64::from_bits(self.loss_sum_bits)
    }
}

fn one() -> u32 {
    1
}

/// A checkpoint on disk.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Its sidecar.
    pub state: RunState,
    /// Weights file.
    pub weights_path: PathBuf,
    /// Optimizer state file.
    pub optimizer_path: PathBuf,
    /// Sidecar file.
    pub sidecar_path: PathBuf,
}

fn tmp(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let t = tmp(path);
    fs::write(&t, bytes).map_err(io(&t))?;
    fs::rename(&t, path).map_err(io(path))
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let t = tmp(path);
    candle_core::safetensors::save(tensors, &t).map_err(|e| CheckpointError::Tensors {
        path: t.clone(),
        message: e.to_string(),
    })?;
    fault_pause();
    fs::rename(&t, path).map_err(io(path))
}

/// Fault injection for tests: with `RSB_FAULT_CHECKPOINT_PAUSE_MS=N` in the environment, each
/// tensor file of a checkpoint waits N ms between being written (under its `.tmp` name) and
/// being renamed, so that a test can kill the process in the middle of a checkpoint (a real
/// write of a small model's files takes a few milliseconds). Nothing else changes.
fn fault_pause() {
    if let Some(ms) = std::env::var("RSB_FAULT_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Writes checkpoint `state.step` into `dir` and points `dir/latest` at it.
///
/// `state.weights` and `state.optimizer` are set here (`step-N.safetensors`,
/// `step-N.optim.safetensors`).
pub fn save(
    dir: &Path,
    varmap: &VarMap,
    optimizer: &dyn TrainOptimizer,
    mut state: RunState,
) -> Result<Checkpoint> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let stem = format!("step-{}", state.step);
    state.weights = format!("{stem}.safetensors");
    state.optimizer = format!("{stem}.optim.safetensors");
    let weights_path = dir.join(&state.weights);
    let optimizer_path = dir.join(&state.optimizer);
    let sidecar_path = dir.join(format!("{stem}.json"));

    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&weights_path, &weights)?;
    save_tensors(
        &optimizer_path,
        &optimizer.state_tensors().into_iter().collect(),
    )?;
    let json = serde_json::to_vec_pretty(&state).expect("RunState serialises");
    write_atomically(&sidecar_path, &json)?;
    write_atomically(&dir.join("latest"), format!("{stem}\n").as_bytes())?;
    Ok(Checkpoint {
        state,
        weights_path,
        optimizer_path,
        sidecar_path,
    })
}

/// The checkpoint `dir/latest` names.
pub fn latest(dir: &Path) -> Result<Checkpoint> {
    let pointer = dir.join("latest");
    let stem = match fs::read_to_string(&pointer) {
        Ok(s) => s.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::NoCheckpoint {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io(&pointer)(e)),
    };
    let sidecar_path = dir.join(format!("{stem}.json"));
    let text = fs::read(&sidecar_path).map_err(io(&sidecar_path))?;
    let state: RunState = serde_json::from_slice(&text).map_err(|e| CheckpointError::Sidecar {
        path: sidecar_path.clone(),
        message: e.to_string(),
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(CheckpointError::Sidecar {
            path: sidecar_path,
            message: format!("found format {}", state.format_version),
        });
    }
    Ok(Checkpoint {
        weights_path: dir.join(&state.weights),
        optimizer_path: dir.join(&state.optimizer),
        sidecar_path,
        state,
    })
}

/// Deletes all but the newest `keep` checkpoints of `dir` (by step; `keep` 0 keeps all): each
/// one's sidecar first (so a half-deleted checkpoint is never taken for a whole one), then its
/// tensor files. The checkpoint `latest` names is always kept. Returns the steps deleted.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<u64>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let latest = fs::read_to_string(dir.join("latest")).map_err(io(dir))?;
    let latest = latest.trim();
    let mut steps: Vec<u64> = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let name = e.map_err(io(dir))?.file_name();
        let name = name.to_string_lossy();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            steps.push(step);
        }
    }
    steps.sort_unstable();
    let old = steps.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for &step in &steps[..old] {
        let stem = format!("step-{step}");
        if stem == latest {
            continue;
        }
        for suffix in [".json", ".safetensors", ".optim.safetensors"] {
            let path = dir.join(format!("{stem}{suffix}"));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        deleted.push(step);
    }
    Ok(deleted)
}

/// Points `dir/latest` at the checkpoint of `step` (written atomically).
pub fn point_latest(dir: &Path, step: u64) -> Result<()> {
    write_atomically(&dir.join("latest"), format!("step-{step}\n").as_bytes())
}

/// Loads weights from `path` (safetensors or a PyTorch `.pth` with timm's names, see
/// [`crate::weights`]) into every variable of `varmap`, by name, converting floating-point
/// tensors (f16, bf16, f64) to the variable's dtype. Every variable must be in the file with its
/// shape, and every tensor of the file must be a variable, except timm's BatchNorm
/// `num_batches_tracked` counters: a missing key, an unexpected key, a wrong shape or a
/// non-floating-point tensor is an error naming the key.
pub fn load_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    load_weights_replacing(varmap, path, &[]).map(|_| ())
}

/// The classifiers of the supported families (timm's names: `fc` in the ResNets, `head.fc` in
/// the RegNets, `classifier` in the EfficientNets, `head` in the Vision Transformers): what
/// fine-tuning replaces. A network has one of the pairs.
pub const CLASSIFIER: [&str; 8] = [
    "fc.weight",
    "fc.bias",
    "head.fc.weight",
    "head.fc.bias",
    "classifier.weight",
    "classifier.bias",
    "head.weight",
    "head.bias",
];

/// [`load_weights`] for fine-tuning: the tensors named in `replaceable` (the classifier) are
/// left as initialised when the file's shapes differ from the network's (another class count),
/// and loaded when they match. Returns the keys left as initialised.
pub fn load_weights_replacing(
    varmap: &VarMap,
    path: &Path,
    replaceable: &[&str],
) -> Result<Vec<String>> {
    let err = |message: String| CheckpointError::Tensors {
        path: path.to_path_buf(),
        message,
    };
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let device = data
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let tensors = crate::weights::read(path, &device)?.tensors;
    let replaced: Vec<String> = replaceable
        .iter()
        .filter(|k| match (data.get(**k), tensors.get(**k)) {
            (Some(v), Some(t)) => v.dims() != t.dims(),
            _ => false,
        })
        .map(|k| k.to_string())
        .collect();
    let list = |keys: &mut Vec<&String>| {
        keys.sort();
        let shown: Vec<&String> = keys.iter().take(5).copied().collect();
        let more = keys.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        format!("{shown:?}{more}")
    };
    let mut missing: Vec<&String> = data.keys().filter(|k| !tensors.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "{} of the network's {} tensors are missing: {} (a checkpoint of another model?)",
            missing.len(),
            data.len(),
            list(&mut missing)
        )));
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !data.contains_key(*k) && !k.ends_with(".num_batches_tracked"))
        .collect();
    if !unexpected.is_empty() {
        return Err(err(format!(
            "{} tensors are not in the network: {} (a checkpoint of another model?)",
            unexpected.len(),
            list(&mut unexpected)
        )));
    }
    let mut names: Vec<&String> = data.keys().filter(|k| !replaced.contains(k)).collect();
    names.sort();
    for name in names {
        let (var, t) = (&data[name], &tensors[name]);
        if !t.dtype().is_float() {
            return Err(err(format!(
                "{name}: dtype {:?} is not floating point (expected f32, f16, bf16 or f64)",
                t.dtype()
            )));
        }
        let resampled;
        let t = match resample_pos_embed_to(name, t, var.dims()) {
            Some(r) => {
                resampled = r.map_err(|e| err(format!("{name}: {e}")))?;
                &resampled
            }
            None => t,
        };
        if t.dims() != var.dims() {
            return Err(err(format!(
                "{name}: expected shape {:?}, found {:?}",
                var.dims(),
                t.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype()).map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(format!("{name}: {e}")))?;
    }
    Ok(replaced)
}

/// The square grid `g` of the position embedding a weights file stores (`pos_embed`,
/// `[1, 1 + g², D]`: a Vision Transformer's), or `None` when it has none.
pub fn stored_grid(path: &Path) -> Result<Option<usize>> {
    let tensors = crate::weights::read(path, &Device::Cpu)?.tensors;
    Ok(tensors.get("pos_embed").and_then(|t| match *t.dims() {
        [1, tokens, _] => square_grid(tokens),
        _ => None,
    }))
}

/// `g` when `tokens` is one class token and a `g x g` grid (`g >= 1`).
fn square_grid(tokens: usize) -> Option<usize> {
    let cells = tokens.checked_sub(1).filter(|&c| c > 0)?;
    let g = (cells as f64).sqrt().round() as usize;
    (g * g == cells).then_some(g)
}

/// A Vision Transformer's stored `pos_embed` `[1, 1 + g², D]` for a network whose grid is
/// another square (`[1, 1 + g'², D]`): resampled bicubically as timm's `resize_pos_embed`
/// (logged). `None` when `name` is not a position embedding of another square grid.
fn resample_pos_embed_to(
    name: &str,
    t: &Tensor,
    want: &[usize],
) -> Option<candle_core::Result<Tensor>> {
    let (&[1, have_t, have_d], &[1, want_t, want_d]) = (t.dims(), want) else {
        return None;
    };
    if name != "pos_embed" || have_d != want_d || have_t == want_t {
        return None;
    }
    let (from, to) = (square_grid(have_t)?, square_grid(want_t)?);
    eprintln!(
        "pos_embed: resampled (bicubic) from a {from}x{from} grid to {to}x{to} while loading"
    );
    Some(crate::model::resample_pos_embed(
        t,
        (from, from),
        (to, to),
        1,
    ))
}

/// Restores the optimizer state saved by [`save`].
pub fn load_optimizer(
    optimizer: &mut dyn TrainOptimizer,
    path: &Path,
    device: &Device,
) -> Result<()> {
    let err = |message: String| CheckpointError::Tensors {
        path: path.to_path_buf(),
        message,
    };
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| err(e.to_string()))?;
    optimizer
        .load_state(&tensors)
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{param_groups, Sgd, SgdConfig};
    use candle_core::DType;
    use candle_nn::VarBuilder;

    fn net(init: f64) -> (VarMap, Vec<(String, candle_core::Var)>) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        vb.get_with_hints((3, 2), "fc.weight", candle_nn::Init::Const(init))
            .unwrap();
        let vars = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (varmap, vars)
    }

    fn state(step: u64) -> RunState {
        RunState {
            format_version: FORMAT_VERSION,
            step,
            epoch: 1,
            loader: LoaderState {
                epoch: 1,
                next_batch: 6,
            },
            seed: 3,
            recipe_hash: "abc".into(),
            weights: String::new(),
            optimizer: String::new(),
            world_size: 1,
            accum_steps: 2,
            metrics_window: Some(LossWindow::new(1, f64::NAN)),
        }
    }

    #[test]
    fn save_then_latest_round_trips_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, vars) = net(0.5);
        let opt = Sgd::new(param_groups(vars, 0.0), SgdConfig::default()).unwrap();
        let err = latest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no checkpoint to resume from"), "{err}");
        save(dir.path(), &varmap, &opt, state(4)).unwrap();
        let ck = save(dir.path(), &varmap, &opt, state(8)).unwrap();
        let found = latest(dir.path()).unwrap();
        assert_eq!(found.state, ck.state);
        assert_eq!(found.state.weights, "step-8.safetensors");
        assert_eq!(found.state.loader.next_batch, 6);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        assert_eq!(names.len(), 7, "2 x 3 files + latest: {names:?}");

        let (other, _) = net(-1.0);
        load_weights(&other, &found.weights_path).unwrap();
        let w = other.data().lock().unwrap()["fc.weight"]
            .as_tensor()
            .clone();
        assert_eq!(
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5; 6]
        );
    }

    #[test]
    fn the_metrics_window_round_trips_exactly_and_older_sidecars_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, vars) = net(0.5);
        let opt = Sgd::new(param_groups(vars, 0.0), SgdConfig::default()).unwrap();
        let mut s = state(3);
        let sum = 0.1 + 0.2 + 1e-17;
        s.metrics_window = Some(LossWindow::new(2, sum));
        save(dir.path(), &varmap, &opt, s).unwrap();
        let w = latest(dir.path()).unwrap().state.metrics_window.unwrap();
        assert_eq!((w.updates, w.loss_sum().to_bits()), (2, sum.to_bits()));

        // A sidecar of format 1 written before the window was saved.
        let side = dir.path().join("step-3.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&side).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("metrics_window");
        fs::write(&side, serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(latest(dir.path()).unwrap().state.metrics_window, None);
    }

    #[test]
    fn a_shape_mismatch_names_the_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, vars) = net(0.5);
        let opt = Sgd::new(param_groups(vars, 0.0), SgdConfig::default()).unwrap();
        let ck = save(dir.path(), &varmap, &opt, state(1)).unwrap();
        let other = VarMap::new();
        VarBuilder::from_varmap(&other, DType::F32, &Device::Cpu)
            .get_with_hints((2, 2), "fc.weight", candle_nn::Init::Const(0.0))
            .unwrap();
        let err = load_weights(&other, &ck.weights_path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step-1.safetensors")
                && err.contains("fc.weight: expected shape [2, 2], found [3, 2]"),
            "{err}"
        );
    }
}
