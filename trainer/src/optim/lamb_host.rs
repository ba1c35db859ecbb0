//! The fused CPU step of [`super::Lamb`] for f32 parameters on the CPU: the moments live in host
//! vectors, and each parameter is updated in two multi-threaded passes over its elements (new
//! moments with the sums of `w²` and `u²`, then the weights) instead of some fifteen candle ops,
//! each a full pass that allocates its result.
//!
//! The element maths is that of the CUDA kernels (`cuda::lamb`, and candle's ops in the same
//! order): every product and sum rounded to f32 on its own (Rust does not contract to FMA), so
//! the moments and the weights of a step without trust ratio are the same bits as on the GPU.
//! Sums run over chunks of [`CHUNK`] elements, 16 lanes of f32 partial sums within a chunk and
//! the chunks added in f64 in order: the same bits for any number of threads.

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

/// Elements per chunk: the unit of the parallel work and of the partial sums.
pub const CHUNK: usize = 16384;

/// Lanes of the f32 partial sums within a chunk (vectorised).
const LANES: usize = 16;

/// True for a tensor the host step handles: f32 on the CPU.
pub fn is_host_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// `Σ x²` of `x`: f32 lane sums within each chunk, f64 over the chunks in order.
fn chunk_sumsq(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        *a += v * v;
    }
    acc.iter().sum()
}

/// The sum of squares of every gradient, for the global norm: each tensor's chunks in parallel,
/// added in f64 in tensor and chunk order.
pub fn grad_sumsq(grads: &[&[f32]]) -> f64 {
    let jobs: Vec<&[f32]> = grads.iter().flat_map(|g| g.chunks(CHUNK)).collect();
    let parts: Vec<f32> = jobs.par_iter().map(|c| chunk_sumsq(c)).collect();
    parts.iter().map(|&p| p as f64).sum()
}

/// The step's scalars, in f32 as the kernels take them.
#[derive(Clone, Copy, Debug)]
pub struct Coeffs {
    pub beta1: f32,
    /// `1 − β1` with gradient averaging, else 1.
    pub beta3: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub inv_bc1: f32,
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
    /// `1 / clip factor` (1 without clipping).
    pub inv_clip: f32,
    pub lr: f32,
    pub trust_clip: bool,
}

/// The update direction of one element from its new moments and weight (the kernels'
/// `lamb_direction`).
#[inline(always)]
fn direction(m: f32, v: f32, w: f32, k: &Coeffs, wd: f32) -> f32 {
    let denom = v.sqrt() * k.inv_bc2_sqrt + k.eps;
    let u = (m * k.inv_bc1) / denom;
    if wd != 0.0 {
        u + w * wd
    } else {
        u
    }
}

/// One parameter's update: `g` its gradient, `m` and `v` its moments (updated), `wd` its weight
/// decay, `adapt` whether the trust ratio applies; the weights are updated in place by
/// [`Tensor::inplace_op1`] on the parameter's own storage.
pub struct ParamStep<'a> {
    pub g: &'a [f32],
    pub m: std::cell::RefCell<&'a mut [f32]>,
    pub v: std::cell::RefCell<&'a mut [f32]>,
    pub k: Coeffs,
    pub wd: f32,
    pub adapt: bool,
}

impl ParamStep<'_> {
    fn run(&self, w: &mut [f32]) {
        let (k, wd, g) = (self.k, self.wd, self.g);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let moments = |g: &[f32], m: &mut [f32], v: &mut [f32]| {
            for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                let gi = g * k.inv_clip;
                *m = *m * k.beta1 + gi * k.beta3;
                *v = *v * k.beta2 + (gi * gi) * k.one_minus_beta2;
            }
        };
        if !self.adapt {
            // One pass: the moments, then the weights with trust 1.
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((w, g), (m, v))| {
                    moments(g, m, v);
                    for ((w, &m), &v) in w.iter_mut().zip(m.iter()).zip(v.iter()) {
                        *w -= direction(m, v, *w, &k, wd) * k.lr;
                    }
                });
            return;
        }
        // Pass 1: the moments and the chunk sums of w² and u².
        let sums: Vec<(f32, f32)> = w
            .par_chunks(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .map(|((w, g), (m, v))| {
                moments(g, m, v);
                let (mut wa, mut ua) = ([0f32; LANES], [0f32; LANES]);
                let mut add = |w: &[f32], m: &[f32], v: &[f32]| {
                    for j in 0..w.len() {
                        let u = direction(m[j], v[j], w[j], &k, wd);
                        wa[j] += w[j] * w[j];
                        ua[j] += u * u;
                    }
                };
                let (mut wc, mut mc, mut vc) = (
                    w.chunks_exact(LANES),
                    m.chunks_exact(LANES),
                    v.chunks_exact(LANES),
                );
                for ((w, m), v) in (&mut wc).zip(&mut mc).zip(&mut vc) {
                    add(w, m, v);
                }
                add(wc.remainder(), mc.remainder(), vc.remainder());
                (wa.iter().sum(), ua.iter().sum())
            })
            .collect();
        let (ws, us) = sums
            .iter()
            .fold((0f64, 0f64), |(a, b), &(w, u)| (a + w as f64, b + u as f64));
        let (w_norm, u_norm) = ((ws as f32).sqrt(), (us as f32).sqrt());
        let ratio = w_norm / u_norm;
        let r = if u_norm > 0.0 { ratio } else { 1.0 };
        let mut trust = if w_norm > 0.0 { r } else { 1.0 };
        if k.trust_clip {
            trust = trust.min(1.0);
        }
        // Pass 2: the weights.
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let u = direction(m, v, *w, &k, wd) * trust;
                    *w -= u * k.lr;
                }
            });
    }
}

impl InplaceOp1 for ParamStep<'_> {
    fn name(&self) -> &'static str {
        "lamb-host-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("lamb host step: an f32 parameter is required")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("lamb host step: a contiguous parameter is required")
        };
        let w = &mut data[start..end];
        if w.len() != self.g.len() || w.len() != self.m.borrow().len() {
            candle_core::bail!(
                "lamb host step: parameter of {} values, gradient of {}, moments of {}",
                w.len(),
                self.g.len(),
                self.m.borrow().len()
            )
        }
        self.run(w);
        Ok(())
    }
}
