//! 2-D max pooling with padding, forward and backward, as candle custom ops.
//!
//! candle's `max_pool2d` has no padding argument and its backward only supports
//! `kernel == stride`, so the ResNet stem pool (`MaxPool2d(3, stride=2, padding=1)`) cannot
//! be trained with it. [`max_pool2d`] follows PyTorch: padding acts as `-inf`, the output size
//! is `floor((H + 2p - k) / s) + 1` (no ceil mode), and the gradient of each output goes to the
//! first maximum of its window in row-major scan order (a NaN counts as a maximum, as in
//! PyTorch's CPU kernel).
//!
//! CPU only for now: on other devices the op returns candle's "no cuda implementation" error.

use rayon::prelude::*;

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape,
    Tensor, WithDType,
};

/// Pooling geometry shared by the forward and backward ops (square windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    /// Window side in pixels.
    pub kernel: usize,
    /// Step between windows in pixels.
    pub stride: usize,
    /// Implicit `-inf` border on each side, in pixels (at most `kernel / 2`, as in PyTorch).
    pub padding: usize,
}

/// Max pooling over the last two dimensions of an `[N, C, H, W]` tensor.
///
/// # Shapes
/// - `xs`: `[N, C, H, W]`, any float dtype (f32, f64, bf16, f16), any strides.
/// - returns `[N, C, Ho, Wo]` with `Ho = (H + 2 * padding - kernel) / stride + 1` (same for `Wo`).
pub fn max_pool2d(xs: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    xs.apply_op1(MaxPool2d {
        kernel,
        stride,
        padding,
    })
}

/// Input geometry of one pooling call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl MaxPool2d {
    fn geometry(&self, layout: &Layout) -> Result<Geometry> {
        let &[n, c, h, w] = layout.dims() else {
            bail!(
                "max_pool2d: expected a 4-d [N, C, H, W] input, got shape {:?}",
                layout.shape()
            )
        };
        if n * c * h * w == 0 {
            bail!("max_pool2d: empty input of shape {:?}", layout.shape())
        }
        if self.kernel == 0 || self.stride == 0 {
            bail!("max_pool2d: kernel and stride must be positive, got {self:?}")
        }
        if 2 * self.padding > self.kernel {
            bail!(
                "max_pool2d: padding {} exceeds half the kernel {}",
                self.padding,
                self.kernel
            )
        }
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            bail!(
                "max_pool2d: input {h}x{w} smaller than kernel {} with padding {}",
                self.kernel,
                self.padding
            )
        }
        let ho = (h + 2 * self.padding - self.kernel) / self.stride + 1;
        let wo = (w + 2 * self.padding - self.kernel) / self.stride + 1;
        Ok(Geometry { n, c, h, w, ho, wo })
    }

    /// Scans the windows of one `[H, W]` plane (`plane = n * C + c`) and calls
    /// `visit(out_index, argmax_index_in_plane, max)` for each output element. `at(plane, y, x)`
    /// reads the input.
    fn scan_plane<T: WithDType>(
        &self,
        g: Geometry,
        plane: usize,
        at: impl Fn(usize, usize, usize) -> T,
        mut visit: impl FnMut(usize, usize, T),
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for oy in 0..g.ho {
            // Window rows clipped to the image; padding never wins over a real value.
            let y0 = (oy * s).saturating_sub(p);
            let y1 = (oy * s + k - p).min(g.h);
            for ox in 0..g.wo {
                let x0 = (ox * s).saturating_sub(p);
                let x1 = (ox * s + k - p).min(g.w);
                let mut best_idx = y0 * g.w + x0;
                let mut best = T::from_f64(f64::NEG_INFINITY);
                for y in y0..y1 {
                    for x in x0..x1 {
                        let v = at(plane, y, x);
                        // `v != v` is NaN: PyTorch lets a NaN win so that it propagates.
                        #[allow(clippy::eq_op)]
                        if v > best || v != v {
                            best = v;
                            best_idx = y * g.w + x;
                        }
                    }
                }
                visit(oy * g.wo + ox, best_idx, best);
            }
        }
    }

    fn fwd_typed<T: WithDType>(&self, xs: &[T], layout: &Layout) -> Result<(Vec<T>, Shape)> {
        let g = self.geometry(layout)?;
        let st = layout.stride();
        let off = layout.start_offset();
        let at = |plane: usize, y: usize, x: usize| {
            let (n, c) = (plane / g.c, plane % g.c);
            xs[off + n * st[0] + c * st[1] + y * st[2] + x * st[3]]
        };
        let mut out = vec![T::zero(); g.n * g.c * g.ho * g.wo];
        // Planes are independent: one rayon task per (sample, channel).
        out.par_chunks_mut(g.ho * g.wo)
            .enumerate()
            .for_each(|(plane, o)| self.scan_plane(g, plane, at, |i, _, v| o[i] = v));
        Ok((out, Shape::from((g.n, g.c, g.ho, g.wo))))
    }

    fn bwd_typed<T: WithDType>(
        &self,
        xs: &[T],
        xs_l: &Layout,
        grad: &[T],
        grad_l: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let g = self.geometry(xs_l)?;
        if grad_l.dims() != [g.n, g.c, g.ho, g.wo] {
            bail!(
                "max_pool2d backward: gradient shape {:?}, expected {:?}",
                grad_l.shape(),
                [g.n, g.c, g.ho, g.wo]
            )
        }
        let st = xs_l.stride();
        let off = xs_l.start_offset();
        let at = |plane: usize, y: usize, x: usize| {
            let (n, c) = (plane / g.c, plane % g.c);
            xs[off + n * st[0] + c * st[1] + y * st[2] + x * st[3]]
        };
        let gst = grad_l.stride();
        let goff = grad_l.start_offset();
        // Accumulate in f64 so overlapping windows sum exactly for every dtype. A window's
        // argmax lies in its own plane, so planes are independent.
        let mut acc = vec![0f64; g.n * g.c * g.h * g.w];
        acc.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(plane, a)| {
                let (n, c) = (plane / g.c, plane % g.c);
                self.scan_plane(g, plane, at, |o, arg, _| {
                    let (oy, ox) = (o / g.wo, o % g.wo);
                    let gv = grad[goff + n * gst[0] + c * gst[1] + oy * gst[2] + ox * gst[3]];
                    a[arg] += gv.to_f64();
                })
            });
        let out = acc.into_iter().map(T::from_f64).collect();
        Ok((out, Shape::from((g.n, g.c, g.h, g.w))))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d-padded"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(match storage {
            CpuStorage::F32(xs) => {
                let (v, s) = self.fwd_typed(xs, layout)?;
                (CpuStorage::F32(v), s)
            }
            CpuStorage::F64(xs) => {
                let (v, s) = self.fwd_typed(xs, layout)?;
                (CpuStorage::F64(v), s)
            }
            CpuStorage::BF16(xs) => {
                let (v, s) = self.fwd_typed(xs, layout)?;
                (CpuStorage::BF16(v), s)
            }
            CpuStorage::F16(xs) => {
                let (v, s) = self.fwd_typed(xs, layout)?;
                (CpuStorage::F16(v), s)
            }
            other => bail!("max_pool2d: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.to_dtype(arg.dtype())?;
        Ok(Some(
            arg.apply_op2_no_bwd(&grad, &MaxPool2dBackward(*self))?,
        ))
    }
}

/// The gradient of [`MaxPool2d`] with respect to its input: `(xs, grad_out) -> grad_xs`.
/// It recomputes the argmax from the input rather than storing indices in the forward pass.
#[derive(Clone, Copy, Debug)]
struct MaxPool2dBackward(MaxPool2d);

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-padded-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(match (s1, s2) {
            (CpuStorage::F32(xs), CpuStorage::F32(gs)) => {
                let (v, s) = self.0.bwd_typed(xs, l1, gs, l2)?;
                (CpuStorage::F32(v), s)
            }
            (CpuStorage::F64(xs), CpuStorage::F64(gs)) => {
                let (v, s) = self.0.bwd_typed(xs, l1, gs, l2)?;
                (CpuStorage::F64(v), s)
            }
            (CpuStorage::BF16(xs), CpuStorage::BF16(gs)) => {
                let (v, s) = self.0.bwd_typed(xs, l1, gs, l2)?;
                (CpuStorage::BF16(v), s)
            }
            (CpuStorage::F16(xs), CpuStorage::F16(gs)) => {
                let (v, s) = self.0.bwd_typed(xs, l1, gs, l2)?;
                (CpuStorage::F16(v), s)
            }
            (a, b) => bail!(
                "max_pool2d backward: unsupported dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        })
    }
}

/// The dtypes [`max_pool2d`] supports on the CPU.
pub const SUPPORTED_DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Brute-force reference on an explicitly `-inf`-padded copy, with a per-window argmax.
    fn reference(
        xs: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        k: usize,
        s: usize,
        p: usize,
        gout: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let mut padded = vec![f32::NEG_INFINITY; n * c * hp * wp];
        for i in 0..n * c {
            for y in 0..h {
                for x in 0..w {
                    padded[i * hp * wp + (y + p) * wp + x + p] = xs[i * h * w + y * w + x];
                }
            }
        }
        let (ho, wo) = ((hp - k) / s + 1, (wp - k) / s + 1);
        let mut out = vec![0f32; n * c * ho * wo];
        let mut gin = vec![0f32; n * c * h * w];
        for i in 0..n * c {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = (f32::NEG_INFINITY, usize::MAX);
                    for dy in 0..k {
                        for dx in 0..k {
                            let (y, x) = (oy * s + dy, ox * s + dx);
                            let v = padded[i * hp * wp + y * wp + x];
                            let real = y >= p && y < h + p && x >= p && x < w + p;
                            if real && (best.1 == usize::MAX || v > best.0) {
                                best = (v, (y - p) * w + (x - p));
                            }
                        }
                    }
                    let o = i * ho * wo + oy * wo + ox;
                    out[o] = best.0;
                    gin[i * h * w + best.1] += gout[o];
                }
            }
        }
        (out, gin)
    }

    fn values(len: usize, seed: u64, levels: u64) -> Vec<f32> {
        // Few distinct levels, so windows contain ties and the first-max rule is exercised.
        let mut r = loader::rng::Rng::new(seed);
        (0..len).map(|_| r.below(levels) as f32 - 3.0).collect()
    }

    #[test]
    fn forward_and_backward_match_brute_force() -> Result<()> {
        let dev = Device::Cpu;
        for &(h, w, k, s, p) in &[
            (8, 8, 3, 2, 1),
            (7, 9, 3, 2, 1),
            (5, 5, 2, 2, 0),
            (6, 5, 3, 1, 1),
            (4, 4, 3, 3, 0),
        ] {
            let dims = (2, 3, h, w);
            let xs = values(2 * 3 * h * w, (h * 31 + w) as u64, 5);
            let x = Var::from_vec(xs.clone(), dims, &dev)?;
            let y = max_pool2d(x.as_tensor(), k, s, p)?;
            let gout: Vec<f32> = (0..y.elem_count()).map(|i| 1.0 + i as f32).collect();
            let (want_y, want_g) = reference(&xs, dims, k, s, p, &gout);
            assert_eq!(
                y.flatten_all()?.to_vec1::<f32>()?,
                want_y,
                "{h}x{w} k{k} s{s} p{p}"
            );
            let gt = Tensor::from_vec(gout, y.shape(), &dev)?;
            let grads = (y * gt)?.sum_all()?.backward()?;
            let g = grads.get(&x).expect("gradient of x").flatten_all()?;
            assert_eq!(g.to_vec1::<f32>()?, want_g, "{h}x{w} k{k} s{s} p{p}");
        }
        Ok(())
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        // Distinct values, so the function is differentiable at the test point.
        let dev = Device::Cpu;
        let (n, c, h, w) = (1, 2, 5, 6);
        let mut r = loader::rng::Rng::new(7);
        let xs: Vec<f64> = (0..n * c * h * w).map(|_| r.normal()).collect();
        let weights: Vec<f64> = (0..n * c * 3 * 3).map(|_| r.normal()).collect();
        let wt = Tensor::from_vec(weights, (n, c, 3, 3), &dev)?;
        let f = |v: &[f64]| -> Result<f64> {
            let t = Tensor::from_vec(v.to_vec(), (n, c, h, w), &dev)?;
            (max_pool2d(&t, 3, 2, 1)? * &wt)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let x = Var::from_vec(xs.clone(), (n, c, h, w), &dev)?;
        let loss = (max_pool2d(x.as_tensor(), 3, 2, 1)? * &wt)?.sum_all()?;
        let g = loss
            .backward()?
            .get(&x)
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let eps = 1e-6;
        for i in 0..xs.len() {
            let (mut a, mut b) = (xs.clone(), xs.clone());
            a[i] += eps;
            b[i] -= eps;
            let num = (f(&a)? - f(&b)?) / (2.0 * eps);
            assert!(
                (num - g[i]).abs() < 1e-6,
                "element {i}: numeric {num}, analytic {}",
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn strided_input_and_half_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        let xs = values(2 * 3 * 6 * 7, 3, 50);
        let x = Tensor::from_vec(xs, (2, 3, 6, 7), &dev)?;
        let want = max_pool2d(&x.contiguous()?, 3, 2, 1)?;
        // A transposed view: non-contiguous strides must be honoured.
        let xt = x.transpose(2, 3)?;
        let got = max_pool2d(&xt, 3, 2, 1)?.transpose(2, 3)?;
        let want_t = max_pool2d(&xt.contiguous()?, 3, 2, 1)?.transpose(2, 3)?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f32>()?,
            want_t.flatten_all()?.to_vec1::<f32>()?
        );
        for dt in SUPPORTED_DTYPES {
            // Small integers are exact in every float dtype.
            let y = max_pool2d(&x.to_dtype(dt)?, 3, 2, 1)?.to_dtype(DType::F32)?;
            assert_eq!(
                y.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?
            );
        }
        assert_eq!(want.dims(), &[2, 3, 3, 4]);
        Ok(())
    }
}
