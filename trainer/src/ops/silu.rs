//! SiLU (`x * sigmoid(x)`, timm's `nn.SiLU`/Swish) as a candle op on the CPU in f32: the
//! forward in one pass and the gradient `dy * s (1 + x (1 - s))` in one more, both in parallel
//! chunks with a vectorised `exp` ([`crate::ops::cpu::kernels::silu_forward`]). candle's `silu`
//! calls libm's `expf` per element and its backward is about six whole-tensor operations.
//! Other dtypes and devices take candle's `silu`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::contiguous_slice;
use super::cpu::kernels;

/// `x * sigmoid(x)`.
///
/// # Shapes
/// - `xs`: any; returns the same shape.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.apply_op1(SiluCpu)
    } else {
        xs.silu()
    }
}

struct SiluCpu;

impl CustomOp1 for SiluCpu {
    fn name(&self) -> &'static str {
        "silu-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_slice(storage.as_slice::<f32>()?, layout, "silu")?;
        Ok((
            CpuStorage::F32(kernels::silu_forward(x)),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(super::cpu::silu_backward(x, dy)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values over the whole useful range, a NaN and both infinities aside.
    fn inputs() -> Vec<f32> {
        (0..20_001).map(|i| (i as f32 - 10_000.0) * 0.01).collect()
    }

    #[test]
    fn forward_and_gradient_match_f64_within_a_few_ulp() -> Result<()> {
        let v = inputs();
        let x = Var::from_vec(v.clone(), v.len(), &Device::Cpu)?;
        let y = silu(x.as_tensor())?;
        let g = y.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).expect("a gradient").to_vec1::<f32>()?;
        let y = y.to_vec1::<f32>()?;
        let (mut worst_y, mut worst_g) = (0f64, 0f64);
        for ((&x, &y), &d) in v.iter().zip(&y).zip(&dx) {
            let x = x as f64;
            let s = 1.0 / (1.0 + (-x).exp());
            let (want_y, want_g) = (x * s, s * (1.0 + x * (1.0 - s)));
            // Relative to the value; the gradient relative to the magnitude of its terms,
            // `s (1 + |x| (1 - s))` (it crosses zero near x = -1.28, where f32's rounding of
            // `1 + x (1 - s)` is what is left).
            // Below x = -87 the exponent is clamped: sigmoid stays near 6e-39 where it would
            // go on falling, an absolute error under 1e-36, measured against a 1e-30 floor.
            worst_y = worst_y.max((y as f64 - want_y).abs() / want_y.abs().max(1e-30));
            let scale = s * (1.0 + x.abs() * (1.0 - s));
            worst_g = worst_g.max((d as f64 - want_g).abs() / scale.max(1e-30));
        }
        println!("silu: worst relative error {worst_y:.2e}, gradient {worst_g:.2e}");
        // f32 carries 6e-8 per rounding: the exp polynomial, the division and the products add a
        // few (observed 6e-7, in the clamped tail, and 9.7e-7 of the terms' magnitude: `1 - s`
        // loses digits for large x, as in every f32 implementation of this formula).
        assert!(worst_y < 1e-6, "silu forward off by {worst_y:e}");
        assert!(worst_g < 1e-6, "silu gradient off by {worst_g:e}");
        Ok(())
    }

    #[test]
    fn extremes_and_nan() -> Result<()> {
        let v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 0.0];
        let y = silu(&Tensor::new(&v, &Device::Cpu)?)?.to_vec1::<f32>()?;
        assert!(y[0].is_nan(), "a NaN passes");
        assert_eq!(y[1], f32::INFINITY);
        assert_eq!(y[3], 1e30);
        assert!(y[4] <= 0.0 && y[4] > -1e-6, "silu(-1e30) = {}", y[4]);
        assert_eq!(y[5], 0.0);
        assert!(y[2].is_nan() || y[2] <= 0.0, "silu(-inf) = {}", y[2]);
        Ok(())
    }
}
