//! LAMB as timm v0.5.4 implements it (`timm/optim/lamb.py`, commit `c207e027`, the NVLAMB variant).

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use super::lamb_host::{self, is_host_f32};
use super::{
    check_groups, check_keys, global_grad_sumsq, read_moment, read_step, step_tensor, OptimError,
    ParamGroup, StepReport, TrainOptimizer, STEP_KEY,
};

/// LAMB hyper-parameters (timm `Lamb.__init__` defaults except where noted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambConfig {
    /// `(β1, β2)` of the moment averages: (0.9, 0.999).
    pub betas: (f64, f64),
    /// Added to `sqrt(v̂)`: 1e-6 (timm's default; not Adam's 1e-8).
    pub eps: f64,
    /// Global gradient-norm clip applied before the moments: `Some(1.0)` in timm (always on).
    /// `None` disables it (timm cannot).
    pub max_grad_norm: Option<f64>,
    /// Divide the moments by `1 - β^t`: true.
    pub bias_correction: bool,
    /// Scale the gradient by `1 - β1` in the first moment: true.
    pub grad_averaging: bool,
    /// Apply the trust ratio to parameters without weight decay too: false.
    pub always_adapt: bool,
    /// Clip the trust ratio at 1 (timm's `lambc`): false.
    pub trust_clip: bool,
}

impl Default for LambConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-6,
            max_grad_norm: Some(1.0),
            bias_correction: true,
            grad_averaging: true,
            always_adapt: false,
            trust_clip: false,
        }
    }
}

/// Per-parameter moments, created at a parameter's first gradient.
#[derive(Clone, Debug)]
enum Moments {
    /// candle tensors (parameters off the host path: f64, or on a GPU).
    Tensors { exp_avg: Tensor, exp_avg_sq: Tensor },
    /// Host vectors that the fused CPU step updates in place (f32 parameters on the CPU).
    Host {
        exp_avg: Vec<f32>,
        exp_avg_sq: Vec<f32>,
    },
}

impl Moments {
    /// Zero moments for `w`, on the host when the fused CPU step handles it.
    fn zeros(w: &Tensor) -> candle_core::Result<Self> {
        Ok(if is_host_f32(w) {
            Moments::Host {
                exp_avg: vec![0.0; w.elem_count()],
                exp_avg_sq: vec![0.0; w.elem_count()],
            }
        } else {
            Moments::Tensors {
                exp_avg: w.zeros_like()?,
                exp_avg_sq: w.zeros_like()?,
            }
        })
    }

    /// The moments as tensors shaped like `w` (a copy for host moments).
    fn tensors(&self, w: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Tensors {
                exp_avg,
                exp_avg_sq,
            } => (exp_avg.clone(), exp_avg_sq.clone()),
            Moments::Host {
                exp_avg,
                exp_avg_sq,
            } => (
                Tensor::from_slice(exp_avg, w.shape(), &Device::Cpu)?,
                Tensor::from_slice(exp_avg_sq, w.shape(), &Device::Cpu)?,
            ),
        })
    }

    /// Moments read from tensors, for the parameter `w`.
    fn from_tensors(w: &Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> candle_core::Result<Self> {
        Ok(if is_host_f32(w) {
            Moments::Host {
                exp_avg: exp_avg.flatten_all()?.to_vec1::<f32>()?,
                exp_avg_sq: exp_avg_sq.flatten_all()?.to_vec1::<f32>()?,
            }
        } else {
            Moments::Tensors {
                exp_avg,
                exp_avg_sq,
            }
        })
    }
}

/// timm v0.5.4 LAMB. For step `t` (shared by all groups):
///
/// 1. `n = sqrt(Σ_all ||g||²)`; when `n > max_grad_norm` every gradient is divided by
///    `n / max_grad_norm` (global, across groups, before the moments).
/// 2. `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`.
/// 3. `u = (m / (1−β1^t)) / (sqrt(v) / sqrt(1−β2^t) + eps)`.
/// 4. If the group's `wd ≠ 0`: `u += wd·w` (L2 inside the update, not decoupled).
/// 5. If `wd ≠ 0` (or `always_adapt`): `u *= ||w|| / ||u||` when both norms are positive, else 1
///    (clipped at 1 with `trust_clip`). Parameters without weight decay (1-D, biases) thus take a
///    plain Adam-style step.
/// 6. `w -= lr·u`, with `lr` the schedule's times the group's `lr_scale`.
///
/// See the [module docs](super) for skipped steps, precision and state.
#[derive(Debug)]
pub struct Lamb {
    groups: Vec<ParamGroup>,
    /// `state[group][param]`.
    state: Vec<Vec<Option<Moments>>>,
    step: u64,
    last_report: Option<StepReport>,
    config: LambConfig,
}

impl Lamb {
    /// An optimizer over `groups` (see [`param_groups`](super::param_groups)).
    pub fn new(groups: Vec<ParamGroup>, config: LambConfig) -> Result<Self, OptimError> {
        check_groups(&groups)?;
        let state = groups.iter().map(|g| vec![None; g.params.len()]).collect();
        Ok(Self {
            groups,
            state,
            step: 0,
            last_report: None,
            config,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LambConfig {
        &self.config
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn moment_keys(name: &str) -> (String, String) {
        (format!("exp_avg.{name}"), format!("exp_avg_sq.{name}"))
    }

    /// `Σ ||g||²` over every gradient: the host sum when all are f32 on the CPU, else candle's.
    fn grad_sumsq(&self, grads: &GradStore) -> Result<f64, OptimError> {
        let mut host = Vec::new();
        for p in self.groups.iter().flat_map(|g| g.params.iter()) {
            match grads.get(p.var.as_tensor()) {
                Some(g) if is_host_f32(g) && g.is_contiguous() => host.push(g.clone()),
                Some(_) => return global_grad_sumsq(&self.groups, grads),
                None => {}
            }
        }
        let slices: Vec<&[f32]> = host
            .iter()
            .map(host_slice)
            .collect::<candle_core::Result<_>>()?;
        Ok(lamb_host::grad_sumsq(&slices))
    }

    /// One update (the body of [`TrainOptimizer::queue_step`]).
    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<StepReport, OptimError> {
        let grad_norm = self.grad_sumsq(grads)?.sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepReport {
                applied: false,
                grad_norm,
                clip_factor: 1.0,
                step: self.step,
            });
        }
        let clip_factor = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => grad_norm / max,
            _ => 1.0,
        };
        self.step += 1;
        let c = &self.config;
        let (beta1, beta2) = c.betas;
        let beta3 = if c.grad_averaging { 1.0 - beta1 } else { 1.0 };
        let (bc1, bc2) = if c.bias_correction {
            // Python's `beta ** step` is C `pow` on doubles.
            let t = self.step as f64;
            (1.0 - beta1.powf(t), 1.0 - beta2.powf(t))
        } else {
            (1.0, 1.0)
        };
        let bc2_sqrt = bc2.sqrt();
        let host = lamb_host::Coeffs {
            beta1: beta1 as f32,
            beta3: beta3 as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: c.eps as f32,
            inv_clip: (1.0 / clip_factor) as f32,
            lr: lr as f32,
            trust_clip: c.trust_clip,
        };
        for (group, states) in self.groups.iter().zip(self.state.iter_mut()) {
            let wd = group.weight_decay;
            let lr = lr * group.lr_scale;
            let host = lamb_host::Coeffs {
                lr: lr as f32,
                ..host
            };
            for (p, state) in group.params.iter().zip(states.iter_mut()) {
                let Some(g) = grads.get(p.var.as_tensor()) else {
                    continue;
                };
                if state.is_none() {
                    *state = Some(Moments::zeros(p.var.as_tensor())?);
                }
                if let Some(Moments::Host {
                    exp_avg,
                    exp_avg_sq,
                }) = state
                {
                    let g = g.detach().to_dtype(DType::F32)?;
                    crate::ops::cpu::with_f32(&g, |g| {
                        p.var.as_tensor().inplace_op1(&lamb_host::ParamStep {
                            g,
                            m: std::cell::RefCell::new(exp_avg),
                            v: std::cell::RefCell::new(exp_avg_sq),
                            k: host,
                            wd: wd as f32,
                            adapt: wd != 0.0 || c.always_adapt,
                        })
                    })??;
                    continue;
                }
                let w = p.var.as_tensor().detach();
                let g = g.detach().to_dtype(DType::F32)?;
                let g = if clip_factor != 1.0 {
                    (g / clip_factor)?
                } else {
                    g
                };
                let Some(Moments::Tensors {
                    exp_avg: prev_avg,
                    exp_avg_sq: prev_avg_sq,
                }) = state.take()
                else {
                    unreachable!("moments created above, host moments handled above")
                };
                let exp_avg = ((prev_avg * beta1)? + (&g * beta3)?)?;
                let exp_avg_sq = ((prev_avg_sq * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let denom = ((exp_avg_sq.sqrt()? / bc2_sqrt)? + c.eps)?;
                let mut update = ((&exp_avg / bc1)? / denom)?;
                if wd != 0.0 {
                    update = (update + (&w * wd)?)?;
                }
                if wd != 0.0 || c.always_adapt {
                    // On device, without a host read: trust = ||w|| / ||u|| if both > 0 else 1.
                    let w_norm = w.sqr()?.sum_all()?.sqrt()?;
                    let u_norm = update.sqr()?.sum_all()?.sqrt()?;
                    let one = w_norm.ones_like()?;
                    let ratio = (&w_norm / &u_norm)?;
                    let ratio = u_norm.gt(0f32)?.where_cond(&ratio, &one)?;
                    let mut trust = w_norm.gt(0f32)?.where_cond(&ratio, &one)?;
                    if c.trust_clip {
                        trust = trust.minimum(&one)?;
                    }
                    update = update.broadcast_mul(&trust)?;
                }
                p.var.set(&(w - (update * lr)?)?)?;
                *state = Some(Moments::Tensors {
                    exp_avg,
                    exp_avg_sq,
                });
            }
        }
        Ok(StepReport {
            applied: true,
            grad_norm,
            clip_factor,
            step: self.step,
        })
    }
}

impl TrainOptimizer for Lamb {
    fn queue_step(&mut self, grads: &GradStore, lr: f64) -> Result<(), OptimError> {
        self.last_report = Some(self.update(grads, lr)?);
        Ok(())
    }

    fn last_report(&mut self) -> Result<Option<StepReport>, OptimError> {
        Ok(self.last_report)
    }

    fn num_steps(&self) -> u64 {
        self.step
    }

    /// Keys: `"step"`, then `"exp_avg.<param>"` and `"exp_avg_sq.<param>"` for every parameter that
    /// has received a gradient.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(STEP_KEY.to_string(), step_tensor(self.step))];
        for (group, states) in self.groups.iter().zip(&self.state) {
            for (p, state) in group.params.iter().zip(states) {
                if let Some(m) = state {
                    let (k1, k2) = Self::moment_keys(&p.name);
                    let (m, v) = m
                        .tensors(p.var.as_tensor())
                        .expect("host moments as tensors");
                    out.push((k1, m));
                    out.push((k2, v));
                }
            }
        }
        out
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), OptimError> {
        let step = read_step(tensors)?;
        let mut known = HashSet::new();
        let mut state = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let mut group_state = Vec::with_capacity(group.params.len());
            for p in &group.params {
                let (k1, k2) = Self::moment_keys(&p.name);
                let w = p.var.as_tensor();
                let m = read_moment(tensors, &k1, w)?;
                let v = read_moment(tensors, &k2, w)?;
                group_state.push(match (m, v) {
                    (Some(exp_avg), Some(exp_avg_sq)) => {
                        Some(Moments::from_tensors(w, exp_avg, exp_avg_sq)?)
                    }
                    (None, None) => None,
                    (Some(_), None) => return Err(OptimError::MissingState { key: k2 }),
                    (None, Some(_)) => return Err(OptimError::MissingState { key: k1 }),
                });
                known.insert(k1);
                known.insert(k2);
            }
            state.push(group_state);
        }
        check_keys(tensors, &known)?;
        self.state = state;
        self.step = step;
        Ok(())
    }
}

/// The values of a contiguous f32 CPU tensor, borrowed from its storage.
fn host_slice(t: &Tensor) -> candle_core::Result<&[f32]> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("lamb: a CPU gradient was expected")
    };
    let values = cpu.as_slice::<f32>()?;
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("lamb: a contiguous gradient was expected".into())
    })?;
    // SAFETY: the storage is kept alive by `t`, which the caller holds for the slice's lifetime;
    // nothing writes to a gradient while the optimizer reads it.
    Ok(unsafe { std::slice::from_raw_parts(values[start..end].as_ptr(), end - start) })
}
