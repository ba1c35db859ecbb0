//! Optimizers over candle [`Var`](candle_core::Var)s: timm's LAMB (the RSB optimizer) and PyTorch-style
//! SGD with momentum, plus timm's weight-decay parameter groups.
//!
//! Both optimizers
//! * take the learning rate per step (the schedule owns it): [`TrainOptimizer::step`]`(grads, lr)`;
//! * read gradients from a [`GradStore`] (`loss.backward()?`); a parameter without a gradient is left
//!   alone and gets no state, as in PyTorch;
//! * skip the whole step when any gradient is non-finite, report it in [`StepReport`] and leave
//!   parameters, moments and the step count untouched. This is what timm's AMP `GradScaler` does
//!   (`scaler.step` skips `optimizer.step()` on inf/nan); without AMP timm would write NaNs into the
//!   weights, which no run wants. The test is on the global gradient norm (per-parameter sums of
//!   squares in f32), so a finite gradient whose squared norm overflows f32 (|g| ≳ 1e19) is also
//!   treated as non-finite;
//! * keep their maths in f32 on the parameters' device and expose their state as named tensors
//!   ([`TrainOptimizer::state_tensors`], [`TrainOptimizer::load_state`]) so a checkpoint restores
//!   them bit-exactly.
//!
//! # Example: one update with gradient accumulation
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use trainer::loss::Targets;
//! use trainer::optim::{param_groups, Lamb, TrainOptimizer};
//! use trainer::recipe::Recipe;
//!
//! let recipe = Recipe::a1();
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let fc = candle_nn::linear(8, 4, VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("fc"))?;
//!
//! // `param_groups` drops BatchNorm running statistics, which a VarMap also holds.
//! let named: Vec<_> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
//! let mut opt = Lamb::new(param_groups(named, recipe.optim.weight_decay), recipe.lamb_config())?;
//! let (base_lr, lr_line) = recipe.resolved_lr(recipe.run.global_batch);
//! println!("{lr_line}");
//! let updates_per_epoch = 625;
//! let schedule = recipe.cosine_schedule(base_lr, updates_per_epoch);
//! let loss_fn = recipe.train_loss();
//!
//! let step = 0; // global update index
//! let micro_batches = 2; // recipe.accumulation_steps() in a real run
//! let mut grads: Option<candle_core::backprop::GradStore> = None;
//! for _ in 0..micro_batches {
//!     let xs = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
//!     let labels = Tensor::new(&[0u32, 1, 2, 3], &dev)?;
//!     let loss = loss_fn.forward(&fc.forward(&xs)?, Targets::Classes(&labels))?;
//!     // Each micro-batch loss is a mean: divide so the sum of gradients is the global mean.
//!     let g = (loss / micro_batches as f64)?.backward()?;
//!     match grads.as_mut() {
//!         None => grads = Some(g),
//!         Some(acc) => acc.extend(g)?, // adds gradients of the same variable
//!     }
//! }
//! // LAMB clips the norm of the accumulated (global-batch mean) gradient, as timm clips the
//! // gradient all-reduced over its ranks.
//! let report = opt.step(&grads.unwrap(), schedule.lr_at(step, updates_per_epoch))?;
//! assert!(report.applied);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Precision
//!
//! Parameters must be f32 ([`OptimError::UnsupportedDType`] otherwise). A bf16/f16 model (the CUDA
//! issue) needs f32 master copies: the optimizer steps the f32 master `Var`s with f32 gradients
//! (cast from the low-precision backward), and the low-precision model weights are refreshed from
//! the masters after each step. Moments stay f32 either way.

mod lamb;
mod lamb_host;
mod param_groups;
mod sgd;

pub use lamb::{Lamb, LambConfig};
pub use param_groups::{
    is_buffer_name, param_groups, scale_trunk_lr, skips_weight_decay, NamedVar, ParamGroup,
};
pub use sgd::{Sgd, SgdConfig};

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

/// Errors of the optimizers and their state (de)serialisation.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed.
    #[error("optimizer tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// A parameter is not f32.
    #[error("parameter {name:?} is {dtype:?}; the optimizer keeps f32 maths and needs f32 (master) parameters")]
    UnsupportedDType {
        /// Parameter name.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// Two parameters share a name, so their state could not be told apart.
    #[error("parameter name {0:?} appears twice in the parameter groups")]
    DuplicateName(String),
    /// A state entry the optimizer needs is missing.
    #[error("optimizer state: missing {key:?}")]
    MissingState {
        /// The missing key.
        key: String,
    },
    /// A state entry names no parameter of this optimizer.
    #[error("optimizer state: unexpected key {key:?} (a parameter renamed, or state of another optimizer?)")]
    UnexpectedState {
        /// The unexpected key.
        key: String,
    },
    /// A state tensor's shape differs from its parameter's.
    #[error("optimizer state {key:?}: expected shape {expected:?}, found {found:?}")]
    StateShape {
        /// The key.
        key: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The stored shape.
        found: Vec<usize>,
    },
}

/// What one call to [`TrainOptimizer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// False when the step was skipped because a gradient was non-finite.
    pub applied: bool,
    /// Global L2 norm of all gradients before any clipping (may be inf/NaN when skipped).
    pub grad_norm: f64,
    /// The factor gradients were divided by (LAMB's global clip; 1 when not clipped).
    pub clip_factor: f64,
    /// The optimizer's step count after this call.
    pub step: u64,
}

/// The interface the training loop uses, shared by [`Lamb`] and [`Sgd`] (and the CUDA LAMB).
///
/// An update is queued ([`TrainOptimizer::queue_step`]) and its report read when wanted
/// ([`TrainOptimizer::last_report`]): on a GPU the report (norm, skip) is computed on the device,
/// and reading it waits for the device to finish the whole step, which a training loop should do
/// only when it writes a metrics line. [`TrainOptimizer::step`] does both.
pub trait TrainOptimizer {
    /// Queues one update of every parameter that has a gradient in `grads`, at learning rate
    /// `lr`. Parameters read after this call see the update (device work is stream-ordered).
    fn queue_step(&mut self, grads: &GradStore, lr: f64) -> Result<(), OptimError>;
    /// The report of the last queued update, waiting for it if it runs on a device; `None`
    /// before the first update.
    fn last_report(&mut self) -> Result<Option<StepReport>, OptimError>;
    /// One update, and its report.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepReport, OptimError> {
        self.queue_step(grads, lr)?;
        Ok(self
            .last_report()?
            .expect("an update was just queued, so there is a report"))
    }
    /// Number of applied steps so far (including a queued update once it is known to apply).
    fn num_steps(&self) -> u64;
    /// The full optimizer state as named tensors (the step count as an i64 scalar under `"step"`),
    /// for a checkpoint. candle tensors are immutable and every step replaces the moments, so the
    /// returned tensors are a snapshot that later steps do not alter.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Restores a state written by [`TrainOptimizer::state_tensors`]. Checks every key and shape
    /// before changing anything; on error the optimizer is unchanged.
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), OptimError>;
}

/// Key of the step count in the state tensors.
pub(crate) const STEP_KEY: &str = "step";

pub(crate) fn step_tensor(step: u64) -> Tensor {
    Tensor::new(step as i64, &Device::Cpu).expect("a scalar on the CPU cannot fail")
}

pub(crate) fn read_step(tensors: &HashMap<String, Tensor>) -> Result<u64, OptimError> {
    let t = tensors
        .get(STEP_KEY)
        .ok_or_else(|| OptimError::MissingState {
            key: STEP_KEY.to_string(),
        })?;
    let step = t.to_dtype(DType::I64)?.reshape(())?.to_scalar::<i64>()?;
    Ok(step.max(0) as u64)
}

/// A stored moment, checked against its parameter and moved to its device as a contiguous f32 copy.
pub(crate) fn read_moment(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    param: &Tensor,
) -> Result<Option<Tensor>, OptimError> {
    let Some(t) = tensors.get(key) else {
        return Ok(None);
    };
    if t.dims() != param.dims() {
        return Err(OptimError::StateShape {
            key: key.to_string(),
            expected: param.dims().to_vec(),
            found: t.dims().to_vec(),
        });
    }
    let t = t.to_dtype(DType::F32)?.to_device(param.device())?;
    Ok(Some(t.copy()?))
}

/// Rejects keys that are neither `"step"` nor in `known`.
pub(crate) fn check_keys(
    tensors: &HashMap<String, Tensor>,
    known: &std::collections::HashSet<String>,
) -> Result<(), OptimError> {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        if key != STEP_KEY && !known.contains(key) {
            return Err(OptimError::UnexpectedState { key: key.clone() });
        }
    }
    Ok(())
}

/// Checks dtypes and name uniqueness of the groups.
pub(crate) fn check_groups(groups: &[ParamGroup]) -> Result<(), OptimError> {
    let mut seen = std::collections::HashSet::new();
    for p in groups.iter().flat_map(|g| g.params.iter()) {
        if p.var.dtype() != DType::F32 {
            return Err(OptimError::UnsupportedDType {
                name: p.name.clone(),
                dtype: p.var.dtype(),
            });
        }
        if !seen.insert(p.name.as_str()) {
            return Err(OptimError::DuplicateName(p.name.clone()));
        }
    }
    Ok(())
}

/// Sum of squares of every gradient present, accumulated in f64 on the host (one value per
/// parameter is read back). Non-finite when any gradient holds inf/NaN.
fn global_grad_sumsq(groups: &[ParamGroup], grads: &GradStore) -> Result<f64, OptimError> {
    let mut partial = Vec::new();
    for p in groups.iter().flat_map(|g| g.params.iter()) {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            partial.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if partial.is_empty() {
        return Ok(0.0);
    }
    // One device-to-host read for all parameters.
    let sums = Tensor::stack(&partial, 0)?.to_device(&Device::Cpu)?;
    Ok(sums.to_vec1::<f32>()?.iter().map(|&s| s as f64).sum())
}
