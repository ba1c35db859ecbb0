//! 2x2 average pooling with PyTorch's `ceil_mode=True, count_include_pad=False`, the pool in
//! front of the ResNet-D downsample shortcut.

use candle_core::{Result, Tensor};

/// `nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`: windows that hang over the
/// bottom or right edge of an odd-sized input average only their pixels inside the image.
/// Built from candle ops (zero padding, `avg_pool2d`, a per-window rescale), so it has a
/// backward pass on every device.
///
/// # Shapes
/// - `xs`: `[N, C, H, W]`
/// - returns `[N, C, ceil(H / 2), ceil(W / 2)]`
pub fn avg_pool2d_ceil(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if h % 2 == 0 && w % 2 == 0 {
        return xs.avg_pool2d(2);
    }
    let padded = xs
        .pad_with_zeros(2, 0, h % 2)?
        .pad_with_zeros(3, 0, w % 2)?;
    let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
    // avg_pool2d divides by 4; windows with fewer real pixels are rescaled by 4 / count.
    let side = |i: usize, n: usize, len: usize| if i + 1 == n && len % 2 == 1 { 1.0 } else { 2.0 };
    let scale: Vec<f32> = (0..ho * wo)
        .map(|i| 4.0 / (side(i / wo, ho, h) * side(i % wo, wo, w)))
        .collect();
    let scale = Tensor::from_vec(scale, (1, 1, ho, wo), xs.device())?.to_dtype(xs.dtype())?;
    padded.avg_pool2d(2)?.broadcast_mul(&scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn odd_sizes_average_only_real_pixels() -> Result<()> {
        let xs = Tensor::arange(0f32, 15.0, &Device::Cpu)?.reshape((1, 1, 3, 5))?;
        let ys = avg_pool2d_ceil(&xs)?;
        // Rows [0..5), [5..10), [10..15); windows 2x2, then the clipped edges.
        let want = [
            [
                (0. + 1. + 5. + 6.) / 4.,
                (2. + 3. + 7. + 8.) / 4.,
                (4. + 9.) / 2.,
            ],
            [(10. + 11.) / 2., (12. + 13.) / 2., 14.],
        ];
        assert_eq!(ys.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?, want);
        let even = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let got = avg_pool2d_ceil(&even)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, [2.5, 4.5, 10.5, 12.5]);
        Ok(())
    }
}
