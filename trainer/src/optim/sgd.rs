//! SGD with momentum, PyTorch `torch.optim.SGD` semantics (for comparison runs).

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::{
    check_groups, check_keys, global_grad_sumsq, read_moment, read_step, step_tensor, OptimError,
    ParamGroup, StepReport, TrainOptimizer, STEP_KEY,
};

/// SGD hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Momentum factor μ (0 disables the buffer).
    pub momentum: f64,
    /// Dampening τ of the gradient in the buffer update (PyTorch default 0).
    pub dampening: f64,
    /// Nesterov momentum (timm's `--opt sgd` turns it on; `momentum` then uses plain momentum).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

/// `torch.optim.SGD`. Per parameter with gradient `g` and its group's weight decay `wd`:
///
/// ```text
/// d = g + wd·w
/// b = d                       (first step)
/// b = μ·b + (1−τ)·d           (later steps)
/// d = d + μ·b if nesterov else b
/// w -= lr·d
/// ```
///
/// No gradient clipping. See the [module docs](super) for skipped steps, precision and state.
#[derive(Debug)]
pub struct Sgd {
    groups: Vec<ParamGroup>,
    /// `buffers[group][param]`: momentum buffers, created at a parameter's first gradient.
    buffers: Vec<Vec<Option<Tensor>>>,
    step: u64,
    last_report: Option<StepReport>,
    config: SgdConfig,
}

impl Sgd {
    /// An optimizer over `groups` (see [`param_groups`](super::param_groups)).
    pub fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Self, OptimError> {
        check_groups(&groups)?;
        let buffers = groups.iter().map(|g| vec![None; g.params.len()]).collect();
        Ok(Self {
            groups,
            buffers,
            step: 0,
            last_report: None,
            config,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    fn buffer_key(name: &str) -> String {
        format!("momentum_buffer.{name}")
    }

    /// One update (the body of [`TrainOptimizer::queue_step`]).
    fn update(&mut self, grads: &GradStore, lr: f64) -> Result<StepReport, OptimError> {
        let grad_norm = global_grad_sumsq(&self.groups, grads)?.sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepReport {
                applied: false,
                grad_norm,
                clip_factor: 1.0,
                step: self.step,
            });
        }
        self.step += 1;
        let c = self.config;
        for (group, buffers) in self.groups.iter().zip(self.buffers.iter_mut()) {
            for (p, buffer) in group.params.iter().zip(buffers.iter_mut()) {
                let Some(g) = grads.get(p.var.as_tensor()) else {
                    continue;
                };
                let w = p.var.as_tensor().detach();
                let mut d = g.detach().to_dtype(DType::F32)?;
                if group.weight_decay != 0.0 {
                    d = (d + (&w * group.weight_decay)?)?;
                }
                if c.momentum != 0.0 {
                    let b = match buffer.take() {
                        None => d.copy()?,
                        Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                    };
                    d = if c.nesterov {
                        (d + (&b * c.momentum)?)?
                    } else {
                        b.clone()
                    };
                    *buffer = Some(b);
                }
                p.var.set(&(w - (d * (lr * group.lr_scale))?)?)?;
            }
        }
        Ok(StepReport {
            applied: true,
            grad_norm,
            clip_factor: 1.0,
            step: self.step,
        })
    }
}

impl TrainOptimizer for Sgd {
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

    /// Keys: `"step"`, then `"momentum_buffer.<param>"` for every parameter with a buffer.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(STEP_KEY.to_string(), step_tensor(self.step))];
        for (group, buffers) in self.groups.iter().zip(&self.buffers) {
            for (p, b) in group.params.iter().zip(buffers) {
                if let Some(b) = b {
                    out.push((Self::buffer_key(&p.name), b.clone()));
                }
            }
        }
        out
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), OptimError> {
        let step = read_step(tensors)?;
        let mut known = HashSet::new();
        let mut buffers = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let mut group_buffers = Vec::with_capacity(group.params.len());
            for p in &group.params {
                let key = Self::buffer_key(&p.name);
                group_buffers.push(read_moment(tensors, &key, p.var.as_tensor())?);
                known.insert(key);
            }
            buffers.push(group_buffers);
        }
        check_keys(tensors, &known)?;
        self.buffers = buffers;
        self.step = step;
        Ok(())
    }
}
