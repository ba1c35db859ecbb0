//! The exact (erf) GELU of PyTorch's `nn.GELU()`, with an exact gradient, as a candle custom op.
//!
//! candle's `gelu_erf` backward writes `1/sqrt(2 pi)` as `0.398942`, a relative error of 7e-7
//! that shows in float64 gradient checks against PyTorch, and it builds the derivative from
//! about eight whole-tensor operations. [`gelu`] computes the forward in one pass and the
//! backward `g * (Phi(x) + x phi(x))` in another, in parallel chunks. CPU f32/f64 only; on other
//! devices and dtypes it is candle's `gelu_erf`.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::contiguous_slice;

use candle_core::cpu::erf::{erf_f32, erf_f64};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// `x * Phi(x)`, `Phi` the standard normal CDF (`0.5 * (1 + erf(x / sqrt 2))`).
///
/// # Shapes
/// - `xs`: any; returns the same shape.
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    use candle_core::DType;
    if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) {
        xs.apply_op1(Gelu)
    } else {
        xs.gelu_erf()
    }
}

struct Gelu;

struct GeluBackward;

macro_rules! gelu_impl {
    ($t:ty, $erf:ident, $fwd:ident, $bwd:ident) => {
        fn $fwd(xs: &[$t]) -> Vec<$t> {
            let half_sqrt2: $t = std::f64::consts::FRAC_1_SQRT_2 as $t;
            let mut out = vec![0.0 as $t; xs.len()];
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK))
                .for_each(|(o, x)| {
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = 0.5 * x * (1.0 + $erf(x * half_sqrt2));
                    }
                });
            out
        }

        fn $bwd(xs: &[$t], gs: &[$t]) -> Vec<$t> {
            let half_sqrt2: $t = std::f64::consts::FRAC_1_SQRT_2 as $t;
            // 1 / sqrt(2 pi)
            let inv_sqrt_2pi: $t =
                (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2) as $t;
            let mut out = vec![0.0 as $t; xs.len()];
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                .for_each(|(o, (x, g))| {
                    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                        let cdf = 0.5 * (1.0 + $erf(x * half_sqrt2));
                        let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
                        *o = g * (cdf + x * pdf);
                    }
                });
            out
        }
    };
}

gelu_impl!(f32, erf_f32, fwd_f32, bwd_f32);
gelu_impl!(f64, erf_f64, fwd_f64, bwd_f64);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf-exact"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = layout.shape().clone();
        Ok(match storage {
            CpuStorage::F32(v) => (
                CpuStorage::F32(fwd_f32(contiguous_slice(v, layout, "gelu")?)),
                shape,
            ),
            CpuStorage::F64(v) => (
                CpuStorage::F64(fwd_f64(contiguous_slice(v, layout, "gelu")?)),
                shape,
            ),
            other => bail!("gelu: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(arg.dtype())?.contiguous()?;
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&g, &GeluBackward)?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-exact-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        if l2.shape() != &shape {
            bail!(
                "gelu backward: gradient shape {:?} is not {:?}",
                l2.shape(),
                shape
            )
        }
        Ok(match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => (
                CpuStorage::F32(bwd_f32(
                    contiguous_slice(x, l1, "gelu backward")?,
                    contiguous_slice(g, l2, "gelu backward")?,
                )),
                shape,
            ),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => (
                CpuStorage::F64(bwd_f64(
                    contiguous_slice(x, l1, "gelu backward")?,
                    contiguous_slice(g, l2, "gelu backward")?,
                )),
                shape,
            ),
            (a, b) => bail!(
                "gelu backward: unsupported dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Forward against `x * Phi(x)` and the gradient against central differences, in f64.
    #[test]
    fn forward_and_gradient_are_exact() -> Result<()> {
        let v: Vec<f64> = (-40..=40).map(|i| i as f64 * 0.15).collect();
        let x = Var::from_vec(v.clone(), v.len(), &Device::Cpu)?;
        let y = gelu(x.as_tensor())?;
        let want: Vec<f64> = v
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf_f64(x / 2f64.sqrt())))
            .collect();
        for (a, b) in y.to_vec1::<f64>()?.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-14 * b.abs(), "{a} vs {b}");
        }
        let grads = y.sum_all()?.backward()?;
        let got = grads.get(x.as_tensor()).unwrap().to_vec1::<f64>()?;
        let f = |x: f64| 0.5 * x * (1.0 + erf_f64(x / 2f64.sqrt()));
        for (&x, &g) in v.iter().zip(&got) {
            let h = 1e-5;
            let fd = (f(x + h) - f(x - h)) / (2.0 * h);
            assert!((g - fd).abs() < 1e-9, "x {x}: {g} vs {fd}");
        }
        // f32 agrees with candle's gelu_erf forward.
        let x32 = Tensor::new(&[-3.0f32, -0.5, 0.0, 0.7, 2.5], &Device::Cpu)?;
        let a = gelu(&x32)?.to_vec1::<f32>()?;
        let b = x32.gelu_erf()?.to_vec1::<f32>()?;
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(gelu(&x32.to_dtype(DType::BF16)?)?.dtype(), DType::BF16);
        Ok(())
    }
}
