//! Row-wise operations of the Vision Transformer as candle custom ops with their gradients:
//! LayerNorm over the last dimension and softmax over the last dimension.
//!
//! Composed from candle's generic ops, LayerNorm takes about nine whole-tensor passes forward and
//! twenty backward (each a separate allocation), softmax five and six. Here each is one parallel
//! pass over the rows forward and one backward. The LayerNorm weight and bias gradients are sums
//! over all rows: partial sums over fixed blocks of rows, added in block order, so the result
//! does not depend on the thread count.
//!
//! CPU f32/f64 with contiguous inputs only; elsewhere (CUDA, bf16) [`layer_norm`] and
//! [`softmax_last_dim`] compose candle's ops, which run on every device.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use super::contiguous_slice;

/// Rows per block of the LayerNorm parameter-gradient sums (fixed, for determinism).
const ROWS_PER_BLOCK: usize = 64;

/// Whether the custom CPU kernels apply to these tensors.
fn fast(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    ts.iter().all(|t| {
        t.device().is_cpu() && t.dtype() == dtype && matches!(dtype, DType::F32 | DType::F64)
    })
}

/// PyTorch's `nn.LayerNorm(D, eps)` over the last dimension: `(x - mean) / sqrt(var + eps) * w
/// + b` with the biased variance (two passes over each row, in the input's precision).
///
/// # Shapes
/// - `xs`: `[..., D]`; `weight`, `bias`: `[D]`; returns the shape of `xs`.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fast(&[xs, weight, bias]) {
        let xs = xs.contiguous()?;
        return xs.apply_op3(weight, bias, LayerNorm { eps });
    }
    let dtype = xs.dtype();
    let wide = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let x = xs.to_dtype(wide)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.to_dtype(wide)?)?
        .broadcast_add(&bias.to_dtype(wide)?)?
        .to_dtype(dtype)
}

/// Softmax over the last dimension (max-subtracted), computed in f32 or f64.
///
/// # Shapes
/// - `xs`: `[..., D]`; returns the same shape.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if fast(&[xs]) {
        return xs.contiguous()?.apply_op1(Softmax);
    }
    let dtype = xs.dtype();
    let x = if dtype == DType::F64 {
        xs.clone()
    } else {
        xs.to_dtype(DType::F32)?
    };
    // The max is a constant of the result: outside the graph.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    num.broadcast_div(&num.sum_keepdim(D::Minus1)?)?
        .to_dtype(dtype)
}

/// Rows per parallel task (whole rows; small rows would make per-row tasks all overhead).
fn rows_per_task(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// Sums in eight interleaved lanes (a fixed order, so results do not depend on threads), which
/// the compiler turns into SIMD; a plain `iter().sum()` over floats is one serial chain.
macro_rules! lanes_sum {
    ($t:ty, $name:ident) => {
        #[inline]
        fn $name(n: usize, f: impl Fn(usize) -> $t) -> $t {
            let mut acc = [0.0 as $t; 8];
            let full = n / 8 * 8;
            let mut i = 0;
            while i < full {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a += f(i + k);
                }
                i += 8;
            }
            let mut tail = 0.0 as $t;
            for j in full..n {
                tail += f(j);
            }
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
        }
    };
}

macro_rules! layer_norm_impl {
    ($t:ty, $fwd:ident, $bwd:ident) => {
        lanes_sum!($t, lsum);

        /// Mean and `1 / sqrt(var + eps)` of one row (two passes, in the row's type).
        fn row_stats(x: &[$t], eps: f64) -> ($t, $t) {
            let n = x.len() as $t;
            let mean = lsum(x.len(), |i| x[i]) / n;
            let var = lsum(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
            (mean, 1.0 / (var + eps as $t).sqrt())
        }

        pub(super) fn $fwd(x: &[$t], w: &[$t], b: &[$t], eps: f64) -> Vec<$t> {
            let d = w.len();
            let step = d * rows_per_task(d);
            let mut out = vec![0.0 as $t; x.len()];
            out.par_chunks_mut(step)
                .zip(x.par_chunks(step))
                .for_each(|(o, x)| {
                    for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                        let (mean, rstd) = row_stats(x, eps);
                        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                            *o = (x - mean) * rstd * w + b;
                        }
                    }
                });
            out
        }

        /// `[dx rows..., dw, db]`: the input gradient followed by the weight and bias
        /// gradients (partial sums per block of [`ROWS_PER_BLOCK`] rows, added in block order).
        pub(super) fn $bwd(x: &[$t], w: &[$t], g: &[$t], eps: f64) -> Vec<$t> {
            let d = w.len();
            let n = d as $t;
            let mut out = vec![0.0 as $t; x.len() + 2 * d];
            let (dx, tail) = out.split_at_mut(x.len());
            let step = d * ROWS_PER_BLOCK;
            let partials: Vec<(Vec<$t>, Vec<$t>)> = dx
                .par_chunks_mut(step)
                .zip(x.par_chunks(step))
                .zip(g.par_chunks(step))
                .map(|((dx, x), g)| {
                    let mut dw = vec![0.0 as $t; d];
                    let mut db = vec![0.0 as $t; d];
                    let mut xh = vec![0.0 as $t; d];
                    let mut gw = vec![0.0 as $t; d];
                    for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let (mean, rstd) = row_stats(x, eps);
                        for i in 0..d {
                            xh[i] = (x[i] - mean) * rstd;
                            gw[i] = g[i] * w[i];
                            dw[i] += g[i] * xh[i];
                            db[i] += g[i];
                        }
                        let sum_gw = lsum(d, |i| gw[i]);
                        let sum_gw_xh = lsum(d, |i| gw[i] * xh[i]);
                        let (a, c) = (sum_gw / n, sum_gw_xh / n);
                        for i in 0..d {
                            dx[i] = rstd * (gw[i] - a - xh[i] * c);
                        }
                    }
                    (dw, db)
                })
                .collect();
            let (tw, tb) = tail.split_at_mut(d);
            for (pw, pb) in &partials {
                for i in 0..d {
                    tw[i] += pw[i];
                    tb[i] += pb[i];
                }
            }
            out
        }
    };
}

mod f32_rows {
    use super::*;
    layer_norm_impl!(f32, fwd, bwd);
}

mod f64_rows {
    use super::*;
    layer_norm_impl!(f64, fwd, bwd);
}

/// `f32_op` or `f64_op` on three contiguous operands of one dtype.
fn apply3(
    what: &str,
    ops: [(&CpuStorage, &Layout); 3],
    f32_op: impl Fn(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64_op: impl Fn(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    let [(a, la), (b, lb), (c, lc)] = ops;
    Ok(match (a, b, c) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32(f32_op(
            contiguous_slice(a, la, what)?,
            contiguous_slice(b, lb, what)?,
            contiguous_slice(c, lc, what)?,
        )),
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64(f64_op(
            contiguous_slice(a, la, what)?,
            contiguous_slice(b, lb, what)?,
            contiguous_slice(c, lc, what)?,
        )),
        _ => bail!("{what}: f32 or f64 operands of one dtype expected"),
    })
}

struct LayerNorm {
    eps: f64,
}

struct LayerNormBackward {
    eps: f64,
}

fn check_ln(lx: &Layout, lw: &Layout, other: &Layout, what: &str) -> Result<usize> {
    let d = lx.shape().dims().last().copied().unwrap_or(0);
    if lw.shape().dims() != [d] {
        bail!(
            "{what}: weight {:?} does not match the last dimension {d}",
            lw.shape()
        )
    }
    if other.shape().elem_count() != lx.shape().elem_count() && other.shape().dims() != [d] {
        bail!(
            "{what}: operand {:?} does not match {:?}",
            other.shape(),
            lx.shape()
        )
    }
    if d == 0 {
        bail!("{what}: empty last dimension")
    }
    Ok(d)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_ln(lx, lw, lb, "layer_norm")?;
        let shape = lx.shape().clone();
        let what = "layer_norm";
        let eps = self.eps;
        let out = apply3(
            what,
            [(sx, lx), (sw, lw), (sb, lb)],
            |x, w, b| f32_rows::fwd(x, w, b, eps),
            |x, w, b| f64_rows::fwd(x, w, b, eps),
        )?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let rows = x.elem_count() / d;
        let g = grad.to_dtype(x.dtype())?.contiguous()?;
        let packed = x.apply_op3_no_bwd(w, &g, &LayerNormBackward { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-rows-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = check_ln(lx, lw, lg, "layer_norm backward")?;
        if lg.shape() != lx.shape() {
            bail!(
                "layer_norm backward: gradient {:?} is not {:?}",
                lg.shape(),
                lx.shape()
            )
        }
        let rows = lx.shape().elem_count() / d;
        let shape = Shape::from((rows + 2, d));
        let what = "layer_norm backward";
        let eps = self.eps;
        let out = apply3(
            what,
            [(sx, lx), (sw, lw), (sg, lg)],
            |x, w, g| f32_rows::bwd(x, w, g, eps),
            |x, w, g| f64_rows::bwd(x, w, g, eps),
        )?;
        Ok((out, shape))
    }
}

struct Softmax;

struct SoftmaxBackward;

macro_rules! softmax_impl {
    ($t:ty, $fwd:ident, $bwd:ident, $lsum:ident) => {
        lanes_sum!($t, $lsum);

        fn $fwd(x: &[$t], d: usize) -> Vec<$t> {
            let step = d * rows_per_task(d);
            let mut out = vec![0.0 as $t; x.len()];
            out.par_chunks_mut(step)
                .zip(x.par_chunks(step))
                .for_each(|(o, x)| {
                    for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                        let max = x.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
                        for (o, &x) in o.iter_mut().zip(x) {
                            *o = (x - max).exp();
                        }
                        let inv = 1.0 / $lsum(d, |i| o[i]);
                        for o in o.iter_mut() {
                            *o *= inv;
                        }
                    }
                });
            out
        }

        /// `dx = y * (g - sum(g * y))` per row.
        fn $bwd(y: &[$t], g: &[$t], d: usize) -> Vec<$t> {
            let step = d * rows_per_task(d);
            let mut out = vec![0.0 as $t; y.len()];
            out.par_chunks_mut(step)
                .zip(y.par_chunks(step).zip(g.par_chunks(step)))
                .for_each(|(o, (y, g))| {
                    for ((o, y), g) in o.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                        let dot = $lsum(d, |i| y[i] * g[i]);
                        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                            *o = y * (g - dot);
                        }
                    }
                });
            out
        }
    };
}

softmax_impl!(f32, softmax_fwd_f32, softmax_bwd_f32, lsum_f32);
softmax_impl!(f64, softmax_fwd_f64, softmax_bwd_f64, lsum_f64);

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = l.shape().clone();
        let d = shape.dims().last().copied().unwrap_or(1).max(1);
        Ok(match s {
            CpuStorage::F32(x) => (
                CpuStorage::F32(softmax_fwd_f32(contiguous_slice(x, l, "softmax")?, d)),
                shape,
            ),
            CpuStorage::F64(x) => (
                CpuStorage::F64(softmax_fwd_f64(contiguous_slice(x, l, "softmax")?, d)),
                shape,
            ),
            other => bail!("softmax: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(res.dtype())?.contiguous()?;
        Ok(Some(
            res.contiguous()?.apply_op2_no_bwd(&g, &SoftmaxBackward)?,
        ))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-rows-backward"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = ly.shape().clone();
        if lg.shape() != &shape {
            bail!(
                "softmax backward: gradient {:?} is not {:?}",
                lg.shape(),
                shape
            )
        }
        let d = shape.dims().last().copied().unwrap_or(1).max(1);
        let what = "softmax backward";
        Ok(match (sy, sg) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => (
                CpuStorage::F32(softmax_bwd_f32(
                    contiguous_slice(y, ly, what)?,
                    contiguous_slice(g, lg, what)?,
                    d,
                )),
                shape,
            ),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => (
                CpuStorage::F64(softmax_bwd_f64(
                    contiguous_slice(y, ly, what)?,
                    contiguous_slice(g, lg, what)?,
                    d,
                )),
                shape,
            ),
            _ => bail!("softmax backward: f32 or f64 operands of one dtype expected"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut r = loader::rng::Rng::new(seed);
        (0..n).map(|_| r.uniform(-2.0, 2.0)).collect()
    }

    /// The fused kernels against the same formulas composed from candle's ops (what the other
    /// devices run), forward and every gradient, in f64.
    #[test]
    fn fused_equals_composed_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, d) = (130, 24);
        let x = Var::from_vec(values(rows * d, 1), (2, rows / 2, d), &dev)?;
        let w = Var::from_vec(values(d, 2), d, &dev)?;
        let b = Var::from_vec(values(d, 3), d, &dev)?;
        let coef = Tensor::from_vec(values(rows * d, 4), (2, rows / 2, d), &dev)?;
        let run = |fused: bool| -> Result<Vec<Vec<f64>>> {
            let y = if fused {
                layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6)?
            } else {
                // The composed path: what the fused path would compute.
                let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let v = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(v + 1e-6)?.sqrt()?)?
                    .broadcast_mul(w.as_tensor())?
                    .broadcast_add(b.as_tensor())?
            };
            let s = if fused {
                softmax_last_dim(&y)?
            } else {
                let m = y.max_keepdim(D::Minus1)?.detach();
                let e = y.broadcast_sub(&m)?.exp()?;
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            };
            let loss = (s * &coef)?.sum_all()?;
            let g = loss.backward()?;
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f64>();
            Ok(vec![
                flat(&y)?,
                flat(g.get(x.as_tensor()).unwrap())?,
                flat(g.get(w.as_tensor()).unwrap())?,
                flat(g.get(b.as_tensor()).unwrap())?,
            ])
        };
        let (a, c) = (run(true)?, run(false)?);
        for (k, (a, c)) in a.iter().zip(&c).enumerate() {
            let diff = a
                .iter()
                .zip(c)
                .map(|(a, c)| (a - c).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "output {k}: {diff}");
        }
        Ok(())
    }

    /// f32 gives the same parameter gradients whatever the rayon pool size.
    #[test]
    fn layer_norm_gradients_do_not_depend_on_threads() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, d) = (300, 16);
        let x = Var::from_vec(
            values(rows * d, 5).iter().map(|&v| v as f32).collect(),
            (rows, d),
            &dev,
        )?;
        let w = Var::from_vec(vec![1.5f32; d], d, &dev)?;
        let b = Var::from_vec(vec![0.1f32; d], d, &dev)?;
        let grads = |threads: usize| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
            })
        };
        assert_eq!(grads(1), grads(3));
        Ok(())
    }
}
