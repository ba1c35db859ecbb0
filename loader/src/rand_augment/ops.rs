//! The pixel operations of RandAugment on packed RGB8 images, with Pillow's arithmetic.
//!
//! Every function works in place on `img` (`width * height * 3` bytes, rows packed). Where
//! Pillow's result depends on its arithmetic (truncating casts, float vs integer maths, the
//! order of the taps), the code follows it step by step, so most operations match Pillow
//! bit for bit; the golden test (`tests/tests/rand_augment.rs`) says which and by how much.
//!
//! - Lookup-table ops (`ImageOps`): [`invert`], [`posterize`], [`solarize`], [`solarize_add`],
//!   [`auto_contrast`] and [`equalize`] (both per channel, from the channel's histogram).
//! - Blends (`ImageEnhance`): [`enhance`] blends the image against a degenerate image
//!   (grayscale, mean gray, black, or the 3x3 smoothed image) as `Image.blend` does.
//! - Geometry (`Image.transform(AFFINE)` and `Image.rotate`): [`affine`] maps each output pixel
//!   centre to input coordinates and samples there with Pillow's bilinear or bicubic filter
//!   (the latter the a = -1 cubic of `Geometry.c`, not the resize filter); pixels that map
//!   outside the input keep the fill colour.

use crate::transform::Interpolation;

/// Pixel layout: RGB, 3 bytes per pixel.
const CH: usize = 3;

/// `255 - v` for every byte (`ImageOps.invert`).
pub fn invert(img: &mut [u8]) {
    for v in img.iter_mut() {
        *v = 255 - *v;
    }
}

/// Keeps the `bits` most significant bits of every byte (`ImageOps.posterize`); 8 or more
/// leaves the image unchanged, 0 makes it black.
pub fn posterize(img: &mut [u8], bits: u32) {
    if bits >= 8 {
        return;
    }
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    for v in img.iter_mut() {
        *v &= mask;
    }
}

/// Inverts every byte at or above `threshold` (`ImageOps.solarize`); 256 or more leaves the
/// image unchanged.
pub fn solarize(img: &mut [u8], threshold: u32) {
    for v in img.iter_mut() {
        if u32::from(*v) >= threshold {
            *v = 255 - *v;
        }
    }
}

/// Adds `add` (saturating at 255) to every byte below `threshold` (timm's `solarize_add`,
/// threshold 128).
pub fn solarize_add(img: &mut [u8], add: u32, threshold: u32) {
    let add = add.min(255) as u8;
    for v in img.iter_mut() {
        if u32::from(*v) < threshold {
            *v = v.saturating_add(add);
        }
    }
}

fn histograms(img: &[u8]) -> [[u32; 256]; CH] {
    let mut h = [[0u32; 256]; CH];
    for px in img.chunks_exact(CH) {
        for c in 0..CH {
            h[c][px[c] as usize] += 1;
        }
    }
    h
}

fn apply_luts(img: &mut [u8], luts: &[[u8; 256]; CH]) {
    for px in img.chunks_exact_mut(CH) {
        for c in 0..CH {
            px[c] = luts[c][px[c] as usize];
        }
    }
}

/// Stretches each channel so its darkest value becomes 0 and its brightest 255
/// (`ImageOps.autocontrast` with no cutoff): `int(v * scale + offset)` clamped, with
/// `scale = 255 / (hi - lo)`, `offset = -lo * scale`. A channel with one value is left alone.
pub fn auto_contrast(img: &mut [u8]) {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; CH];
    for c in 0..CH {
        let h = &hist[c];
        let lo = (0..256).find(|&i| h[i] != 0).unwrap_or(0);
        let hi = (0..256).rev().find(|&i| h[i] != 0).unwrap_or(0);
        for (i, out) in luts[c].iter_mut().enumerate() {
            *out = if hi <= lo {
                i as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                // Python's int() truncates toward zero.
                let v = (i as f64 * scale + offset).trunc();
                v.clamp(0.0, 255.0) as u8
            };
        }
    }
    apply_luts(img, &luts);
}

/// Histogram equalisation per channel (`ImageOps.equalize`): with `step = (N - count of the
/// last used value) / 255` (integer division), value `i` maps to `(step / 2 + number of pixels
/// below i) / step`; a channel with one used value, or `step == 0`, is left alone.
pub fn equalize(img: &mut [u8]) {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; CH];
    for c in 0..CH {
        let h = &hist[c];
        let used: Vec<u64> = h.iter().filter(|&&n| n != 0).map(|&n| n as u64).collect();
        let step = if used.len() <= 1 {
            0
        } else {
            (used.iter().sum::<u64>() - used[used.len() - 1]) / 255
        };
        for (i, out) in luts[c].iter_mut().enumerate() {
            *out = i as u8;
        }
        if step == 0 {
            continue;
        }
        let mut n = step / 2;
        for i in 0..256 {
            luts[c][i] = (n / step).min(255) as u8;
            n += h[i] as u64;
        }
    }
    apply_luts(img, &luts);
}

/// The degenerate image an enhancement blends against (`PIL.ImageEnhance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enhance {
    /// `Color`: the grayscale image (ITU-R 601 luma, Pillow's integer formula).
    Color,
    /// `Contrast`: a flat image at the rounded mean luma.
    Contrast,
    /// `Brightness`: black.
    Brightness,
    /// `Sharpness`: the image smoothed by `[[1,1,1],[1,5,1],[1,1,1]] / 13`, borders unchanged.
    Sharpness,
}

/// Pillow's RGB to L: `(299 R + 587 G + 114 B) / 1000` in 16-bit fixed point, rounded.
#[inline]
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `Image.blend(degenerate, image, factor)` for one byte: `degenerate + factor * (image -
/// degenerate)` in single precision, truncated, clamped to [0, 255] when extrapolating.
/// (Clamping first and truncating after gives the same byte as Pillow's branches, and lets
/// the loops vectorise.)
#[inline(always)]
fn blend(degenerate: u8, image: u8, factor: f32) -> u8 {
    let d = degenerate as i32;
    let v = d as f32 + factor * (image as i32 - d) as f32;
    to_u8(v)
}

/// Clamps to [0, 255] and truncates: Pillow's `clip8`-style store of a float.
#[inline(always)]
fn to_u8(v: f32) -> u8 {
    v.clamp(0.0, 255.0) as u8
}

/// A table of `blend(degenerate, v, factor)` for every `v`.
fn blend_lut(degenerate: u8, factor: f32) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (v, out) in lut.iter_mut().enumerate() {
        *out = blend(degenerate, v as u8, factor);
    }
    lut
}

/// Runs `$body` compiled for AVX2 when the CPU has it (same IEEE arithmetic lane by lane, no
/// fused multiply-add, so the same bytes as the baseline build), else for the baseline target.
macro_rules! dispatch_avx2 {
    ($avx2_fn:ident, $base:expr, ($($arg:ident: $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn $avx2_fn($($arg: $ty),*) {
                $base
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { $avx2_fn($($arg),*) };
            }
        }
        $base
    }};
}

/// `ImageEnhance.<kind>(img).enhance(factor)`: 0 gives the degenerate image, 1 the image,
/// above 1 extrapolates away from the degenerate image. `scratch` is reused for Sharpness.
pub fn enhance(
    img: &mut [u8],
    width: usize,
    height: usize,
    kind: Enhance,
    factor: f64,
    scratch: &mut Vec<u8>,
) {
    dispatch_avx2!(
        enhance_avx2,
        enhance_impl(img, width, height, kind, factor, scratch),
        (img: &mut [u8], width: usize, height: usize, kind: Enhance, factor: f64, scratch: &mut Vec<u8>)
    )
}

#[allow(clippy::too_many_arguments)]
fn transform(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
    interpolation: Interpolation,
    fill: [u8; 3],
    exact: bool,
) {
    dispatch_avx2!(
        transform_avx2,
        transform_impl(src, dst, width, height, m, interpolation, fill, exact),
        (src: &[u8], dst: &mut [u8], width: usize, height: usize, m: AffineMatrix,
         interpolation: Interpolation, fill: [u8; 3], exact: bool)
    )
}

/// `ImageEnhance.<kind>(img).enhance(factor)`: 0 gives the degenerate image, 1 the image,
/// above 1 extrapolates away from the degenerate image. `scratch` is reused for Sharpness.
#[inline(always)]
fn enhance_impl(
    img: &mut [u8],
    width: usize,
    height: usize,
    kind: Enhance,
    factor: f64,
    scratch: &mut Vec<u8>,
) {
    // Pillow passes the factor to C as a float.
    let f = factor as f32;
    match kind {
        Enhance::Color => {
            for px in img.chunks_exact_mut(CH) {
                let l = luma(px[0], px[1], px[2]);
                px[0] = blend(l, px[0], f);
                px[1] = blend(l, px[1], f);
                px[2] = blend(l, px[2], f);
            }
        }
        Enhance::Contrast => {
            let mut sum = 0u64;
            for px in img.chunks_exact(CH) {
                sum += luma(px[0], px[1], px[2]) as u64;
            }
            let n = (width * height).max(1) as f64;
            let mean = (sum as f64 / n + 0.5) as u8;
            let lut = blend_lut(mean, f);
            for v in img.iter_mut() {
                *v = lut[*v as usize];
            }
        }
        Enhance::Brightness => {
            let lut = blend_lut(0, f);
            for v in img.iter_mut() {
                *v = lut[*v as usize];
            }
        }
        Enhance::Sharpness => {
            smooth_3x3(img, width, height, scratch);
            for (v, &d) in img.iter_mut().zip(scratch.iter()) {
                *v = blend(d, *v, f);
            }
        }
    }
}

/// Pillow's `ImageFilter.SMOOTH` into `out`: kernel `[1,1,1,1,5,1,1,1,1] / 13` in single
/// precision, summed from 0.5 (Pillow's rounding offset) row below, centre row, row above,
/// each row's taps left to right, then truncated; the first and last rows and columns are
/// copied unchanged.
#[inline(always)]
fn smooth_3x3(img: &[u8], width: usize, height: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(img);
    if width < 3 || height < 3 {
        return;
    }
    let k1 = 1.0f32 / 13.0;
    let k5 = 5.0f32 / 13.0;
    let stride = width * CH;
    let n = stride - 2 * CH;
    for y in 1..height - 1 {
        let above = &img[(y - 1) * stride..y * stride];
        let row = &img[y * stride..(y + 1) * stride];
        let below = &img[(y + 1) * stride..(y + 2) * stride];
        let dst = &mut out[y * stride + CH..(y + 1) * stride - CH];
        fn taps(r: &[u8], n: usize) -> (&[u8], &[u8], &[u8]) {
            (&r[..n], &r[CH..CH + n], &r[2 * CH..2 * CH + n])
        }
        let (b0, b1, b2) = taps(below, n);
        let (r0, r1, r2) = taps(row, n);
        let (a0, a1, a2) = taps(above, n);
        for i in 0..n {
            let f = |v: u8| v as f32;
            let mut s = 0.5f32;
            s += f(b0[i]) * k1 + f(b1[i]) * k1 + f(b2[i]) * k1;
            s += f(r0[i]) * k1 + f(r1[i]) * k5 + f(r2[i]) * k1;
            s += f(a0[i]) * k1 + f(a1[i]) * k1 + f(a2[i]) * k1;
            dst[i] = to_u8(s);
        }
    }
}

/// A 2x3 affine map from output to input coordinates, Pillow's `(a, b, c, d, e, f)`:
/// `x_in = a x + b y + c`, `y_in = d x + e y + f`, evaluated at output pixel centres.
pub type AffineMatrix = [f64; 6];

/// `Image.transform(size, AFFINE, m, resample, fillcolor=fill)` on an RGB8 image: output
/// pixel (x, y) samples the input at `m` applied to `(x + 0.5, y + 0.5)`; where that falls
/// outside the input the pixel is `fill`. `src` and `dst` are both `width x height`.
///
/// This is the fast version used in training: the sample positions, the bounds and the
/// edge handling are Pillow's, but each pixel's filter is evaluated as weights (computed
/// once per pixel, in single precision) applied to the three channels, instead of Pillow's
/// double-precision Horner evaluation per channel. A result that lands within rounding
/// error of an integer can then truncate one level differently; [`affine_exact`] is the
/// bit-exact version, and the tests measure how far the two are apart.
pub fn affine(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
    interpolation: Interpolation,
    fill: [u8; 3],
) {
    transform(src, dst, width, height, m, interpolation, fill, false)
}

/// [`affine`] with Pillow's arithmetic step by step (double precision, per channel, its
/// order of operations and truncating casts): the same bytes as Pillow.
pub fn affine_exact(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
    interpolation: Interpolation,
    fill: [u8; 3],
) {
    transform(src, dst, width, height, m, interpolation, fill, true)
}

/// When every output row maps onto one input row (shear and translation along x) the
/// vertical interpolation weight is exactly 0 and the result is the horizontal pass alone;
/// likewise for columns (along y). Those cases skip the zero-weight pass.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transform_impl(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
    interpolation: Interpolation,
    fill: [u8; 3],
    exact: bool,
) {
    assert_eq!(
        src.len(),
        width * height * CH,
        "source is not {width}x{height} RGB"
    );
    assert_eq!(dst.len(), src.len(), "destination size");
    for px in dst.chunks_exact_mut(CH) {
        px.copy_from_slice(&fill);
    }
    if width == 0 || height == 0 {
        return;
    }
    let mode = if m[3] == 0.0 && m[4] == 1.0 && m[5] == 0.0 {
        Pass::Rows
    } else if m[0] == 1.0 && m[1] == 0.0 && m[2] == 0.0 {
        Pass::Cols
    } else {
        Pass::Both
    };
    let (w, h) = (width, height);
    macro_rules! run {
        ($cubic:literal, $passes:literal) => {
            if exact {
                exact_with::<$cubic, $passes>(src, dst, w, h, m)
            } else {
                fast_shift::<$cubic, $passes>(src, dst, w, h, m)
            }
        };
    }
    match (interpolation, mode) {
        (Interpolation::Bilinear, Pass::Rows) => run!(false, 1),
        (Interpolation::Bilinear, Pass::Cols) => run!(false, 2),
        (Interpolation::Bilinear, Pass::Both) => run!(false, 3),
        (Interpolation::Bicubic, Pass::Rows) => run!(true, 1),
        (Interpolation::Bicubic, Pass::Cols) => run!(true, 2),
        (Interpolation::Bicubic, Pass::Both) => run!(true, 3),
    }
}

/// Pillow's a = -1 cubic as weights on `v1..v4` at `d` (expanding its Horner form
/// `v2 + d (p2 + d (p3 + d p4))`).
#[inline(always)]
fn cubic_weights(d: f32) -> [f32; 4] {
    let (d2, d3) = (d * d, d * d * d);
    [
        -d + 2.0 * d2 - d3,
        1.0 - 2.0 * d2 + d3,
        d + d2 - d3,
        -d2 + d3,
    ]
}

/// Shifts along one axis with a shift that is constant along a row (shear and translation
/// along x) or along a column (along y): the filter weights are computed once per row or
/// column, and the rows' interiors run as straight loops over bytes that the compiler
/// vectorises. Anything else (rotation) goes through [`fast_with`].
#[inline(always)]
fn fast_shift<const CUBIC: bool, const PASSES: u8>(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
) {
    let unit = m[0] == 1.0 && m[4] == 1.0;
    if PASSES == 1 && unit {
        // x_in = x + 0.5 + (m1 (y + 0.5) + m2), y_in = y + 0.5.
        for y in 0..height {
            let shift = m[1] * (y as f64 + 0.5) + m[2];
            let row = &src[y * width * CH..(y + 1) * width * CH];
            let out = &mut dst[y * width * CH..(y + 1) * width * CH];
            shift_line::<CUBIC>(row, out, width, shift);
        }
    } else if PASSES == 2 && unit && m[3] == 0.0 {
        // A vertical translation: every column moves by m5. Output row y blends input rows
        // around y + m5 with the same weights: a loop over whole rows.
        let shift = m[5];
        let stride = width * CH;
        let (lo, hi) = valid_range(height, shift);
        let t0 = shift.floor();
        let d = (shift - t0) as f32;
        let w = line_weights::<CUBIC>(d);
        let first = if CUBIC { -1 } else { 0 };
        let mut acc = vec![0f32; stride];
        for y in lo..hi {
            let out = &mut dst[y * stride..(y + 1) * stride];
            acc.fill(0.0);
            for (k, wk) in w.iter().enumerate().take(if CUBIC { 4 } else { 2 }) {
                let r = (y as i64 + t0 as i64 + first + k as i64).clamp(0, height as i64 - 1);
                let row = &src[r as usize * stride..(r as usize + 1) * stride];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += wk * v as f32;
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = to_u8(*a);
            }
        }
    } else if PASSES == 2 && unit {
        // A vertical shear: column x moves by m3 (x + 0.5) + m5, one weight set per column.
        let stride = width * CH;
        let first = if CUBIC { -1 } else { 0 };
        for x in 0..width {
            let shift = m[3] * (x as f64 + 0.5) + m[5];
            let (lo, hi) = valid_range(height, shift);
            let t0 = shift.floor() as i64;
            let w = line_weights::<CUBIC>((shift - t0 as f64) as f32);
            for y in lo..hi {
                let mut acc = [0f32; CH];
                for (k, wk) in w.iter().enumerate().take(if CUBIC { 4 } else { 2 }) {
                    let r = (y as i64 + t0 + first + k as i64).clamp(0, height as i64 - 1);
                    let p = &src[r as usize * stride + x * CH..][..CH];
                    for c in 0..CH {
                        acc[c] += wk * p[c] as f32;
                    }
                }
                let o = &mut dst[y * stride + x * CH..][..CH];
                for c in 0..CH {
                    o[c] = to_u8(acc[c]);
                }
            }
        }
    } else {
        fast_with::<CUBIC, PASSES>(src, dst, width, height, m)
    }
}

/// Output positions `i` in `0..n` whose input coordinate `i + 0.5 + shift` lies in `[0, n)`
/// (Pillow's bounds test), as a range.
#[inline(always)]
fn valid_range(n: usize, shift: f64) -> (usize, usize) {
    let inside = |i: usize| {
        let v = i as f64 + 0.5 + shift;
        v >= 0.0 && v < n as f64
    };
    let lo = (0..n).find(|&i| inside(i)).unwrap_or(n);
    let hi = (lo..n).find(|&i| !inside(i)).unwrap_or(n);
    (lo, hi)
}

/// Filter weights at fractional offset `d` (bicubic: 4 taps from -1; bilinear: 2 from 0).
#[inline(always)]
fn line_weights<const CUBIC: bool>(d: f32) -> [f32; 4] {
    if CUBIC {
        cubic_weights(d)
    } else {
        [1.0 - d, d, 0.0, 0.0]
    }
}

/// One row resampled at `x + shift` (the pixel centre convention folded in: input
/// coordinate `x + 0.5 + shift`), pixels outside left as they are (the fill colour).
#[inline(always)]
fn shift_line<const CUBIC: bool>(row: &[u8], out: &mut [u8], width: usize, shift: f64) {
    let (lo, hi) = valid_range(width, shift);
    if lo >= hi {
        return;
    }
    let t0 = shift.floor() as i64;
    let w = line_weights::<CUBIC>((shift - t0 as f64) as f32);
    let (first, taps) = if CUBIC { (-1i64, 4usize) } else { (0, 2) };
    let wi = width as i64;
    // Interior: output x whose taps x + t0 + first .. + taps - 1 are all inside the row.
    let a = ((-(t0 + first)).max(0) as usize).clamp(lo, hi);
    let b = ((wi - (t0 + first + taps as i64 - 1)).max(0) as usize).clamp(a, hi);
    let edge = |x: usize, out: &mut [u8]| {
        let mut acc = [0f32; CH];
        for (k, wk) in w.iter().enumerate().take(taps) {
            let c0 = (x as i64 + t0 + first + k as i64).clamp(0, wi - 1) as usize * CH;
            for c in 0..CH {
                acc[c] += wk * row[c0 + c] as f32;
            }
        }
        for c in 0..CH {
            out[x * CH + c] = to_u8(acc[c]);
        }
    };
    for x in (lo..a).chain(b..hi) {
        edge(x, out);
    }
    if a < b {
        let n = (b - a) * CH;
        let base = (a as i64 + t0 + first) as usize * CH;
        let dst = &mut out[a * CH..a * CH + n];
        let tap = |k: usize| &row[base + k * CH..base + k * CH + n];
        if CUBIC {
            let (s0, s1, s2, s3) = (tap(0), tap(1), tap(2), tap(3));
            for i in 0..n {
                let v = w[0] * s0[i] as f32
                    + w[1] * s1[i] as f32
                    + w[2] * s2[i] as f32
                    + w[3] * s3[i] as f32;
                dst[i] = to_u8(v);
            }
        } else {
            let (s0, s1) = (tap(0), tap(1));
            for i in 0..n {
                let v = w[0] * s0[i] as f32 + w[1] * s1[i] as f32;
                dst[i] = to_u8(v);
            }
        }
    }
}

/// The fast transform loop (see [`affine`]), specialised like [`exact_with`]. Indices are
/// clamped to the image, which is what Pillow's edge rules amount to: columns are clamped,
/// and a row past the bottom repeats the one above it.
#[inline(always)]
fn fast_with<const CUBIC: bool, const PASSES: u8>(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
) {
    let taps = if CUBIC { 4 } else { 2 };
    let first = if CUBIC { -1 } else { 0 };
    // The 2-D case reads every source byte up to 16 times: convert the image to floats once.
    F32_SCRATCH.with(|f| {
        let mut f = f.borrow_mut();
        if PASSES == 3 {
            f.clear();
            f.extend(src.iter().map(|&v| v as f32));
        }
        fast_with_rows::<CUBIC, PASSES>(src, &f, dst, width, height, m, taps, first);
    });
}

thread_local! {
    static F32_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The loop of [`fast_with`]; `srcf` is `src` as floats when `PASSES == 3`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fast_with_rows<const CUBIC: bool, const PASSES: u8>(
    src: &[u8],
    srcf: &[f32],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
    taps: usize,
    first: i64,
) {
    const TAPS_MAX: usize = 4;
    let (wi, hi) = (width as i64, height as i64);
    let stride = width * CH;
    for_each_sample(dst, width, height, m, |out, xi, yi, dx, dy| {
        let (dx, dy) = (dx as f32, dy as f32);
        let weights = |d: f32| -> [f32; TAPS_MAX] {
            if CUBIC {
                cubic_weights(d)
            } else {
                [1.0 - d, d, 0.0, 0.0]
            }
        };
        let mut acc = [0f32; CH];
        if PASSES == 1 {
            // One input row (y itself), horizontal taps.
            let row = &src[yi as usize * stride..(yi as usize + 1) * stride];
            let wx = weights(dx);
            for (k, wk) in wx.iter().enumerate().take(taps) {
                let c0 = (xi + first + k as i64).clamp(0, wi - 1) as usize * CH;
                let p = &row[c0..c0 + CH];
                for c in 0..CH {
                    acc[c] += wk * p[c] as f32;
                }
            }
        } else if PASSES == 2 {
            // One input column (x itself), vertical taps.
            let c0 = xi as usize * CH;
            let wy = weights(dy);
            for (k, wk) in wy.iter().enumerate().take(taps) {
                let r = (yi + first + k as i64).clamp(0, hi - 1) as usize;
                let p = &src[r * stride + c0..r * stride + c0 + CH];
                for c in 0..CH {
                    acc[c] += wk * p[c] as f32;
                }
            }
        } else if CUBIC && xi >= 1 && xi + 2 < wi && yi >= 1 && yi + 2 < hi {
            // Interior: the 4 taps of a row are 12 contiguous bytes. Weighting all 12 at
            // once and summing the channels at the end lets the compiler use vectors.
            let (wx, wy) = (cubic_weights(dx), cubic_weights(dy));
            let mut wx12 = [0f32; 12];
            for (l, v) in wx12.iter_mut().enumerate() {
                *v = wx[l / CH];
            }
            let mut acc = [0f32; 12];
            let base = (yi as usize - 1) * stride + (xi as usize - 1) * CH;
            for (j, wyj) in wy.iter().enumerate() {
                let p: &[f32; 12] = srcf[base + j * stride..][..12].try_into().unwrap();
                for l in 0..12 {
                    acc[l] += wyj * (wx12[l] * p[l]);
                }
            }
            for c in 0..CH {
                out[c] = to_u8(acc[c] + acc[CH + c] + acc[2 * CH + c] + acc[3 * CH + c]);
            }
            return;
        } else if !CUBIC && xi >= 0 && xi + 1 < wi && yi >= 0 && yi + 1 < hi {
            let (wx, wy) = ([1.0 - dx, dx], [1.0 - dy, dy]);
            let wx6 = [wx[0], wx[0], wx[0], wx[1], wx[1], wx[1]];
            let mut acc = [0f32; 6];
            let base = yi as usize * stride + xi as usize * CH;
            for (j, wyj) in wy.iter().enumerate() {
                let p: &[f32; 6] = srcf[base + j * stride..][..6].try_into().unwrap();
                for l in 0..6 {
                    acc[l] += wyj * (wx6[l] * p[l]);
                }
            }
            for c in 0..CH {
                out[c] = to_u8(acc[c] + acc[CH + c]);
            }
            return;
        } else {
            let (wx, wy) = (weights(dx), weights(dy));
            let mut cols = [0usize; TAPS_MAX];
            for (k, col) in cols.iter_mut().enumerate().take(taps) {
                *col = (xi + first + k as i64).clamp(0, wi - 1) as usize * CH;
            }
            for (j, wyj) in wy.iter().enumerate().take(taps) {
                let r = (yi + first + j as i64).clamp(0, hi - 1) as usize;
                let row = &src[r * stride..(r + 1) * stride];
                let mut line = [0f32; CH];
                for (&col, wk) in cols.iter().zip(&wx).take(taps) {
                    let p = &row[col..col + CH];
                    for c in 0..CH {
                        line[c] += wk * p[c] as f32;
                    }
                }
                for c in 0..CH {
                    acc[c] += wyj * line[c];
                }
            }
        }
        for c in 0..CH {
            out[c] = to_u8(acc[c]);
        }
    });
}

/// Pillow's sampling positions (`ImagingGenericTransform` with `affine_transform`): output
/// pixel (x, y) maps its centre `(x + 0.5, y + 0.5)` through `m`; if that lands inside the
/// input, `f(pixel, xi, yi, dx, dy)` gets the position relative to input pixel centres as its
/// floor and fraction; pixels landing outside are left as they are (the fill).
#[inline(always)]
fn for_each_sample(
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
    mut f: impl FnMut(&mut [u8], i64, i64, f64, f64),
) {
    let (wf, hf) = (width as f64, height as f64);
    for (y, out_row) in dst.chunks_exact_mut(width * CH).enumerate() {
        let yc = y as f64 + 0.5;
        for (x, out) in out_row.chunks_exact_mut(CH).enumerate() {
            let xc = x as f64 + 0.5;
            let xin = m[0] * xc + m[1] * yc + m[2];
            let yin = m[3] * xc + m[4] * yc + m[5];
            if !(xin >= 0.0 && xin < wf && yin >= 0.0 && yin < hf) {
                continue;
            }
            let (xs, ys) = (xin - 0.5, yin - 0.5);
            let (xi, yi) = (floor(xs), floor(ys));
            f(out, xi, yi, xs - xi as f64, ys - yi as f64);
        }
    }
}

#[derive(Clone, Copy)]
enum Pass {
    Rows,
    Cols,
    Both,
}

/// `v.floor() as i64` for the coordinates here (|v| far below 2^53), without the libm call
/// that `floor` costs on x86-64 targets without SSE4.1.
#[inline(always)]
fn floor(v: f64) -> i64 {
    let t = v as i64;
    if (t as f64) > v {
        t - 1
    } else {
        t
    }
}

/// Pillow's a = -1 cubic through `v1..v4` at `d` in [0, 1) past `v2` (`Geometry.c` BICUBIC).
#[inline(always)]
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// The transform loop, specialised on the filter (`CUBIC`) and on which passes run
/// (`PASSES`: 1 horizontal only, 2 vertical only, 3 both).
#[inline(always)]
fn exact_with<const CUBIC: bool, const PASSES: u8>(
    src: &[u8],
    dst: &mut [u8],
    width: usize,
    height: usize,
    m: AffineMatrix,
) {
    let (wi, hi) = (width as i64, height as i64);
    let stride = width * CH;
    let px = |r: usize, col: usize, c: usize| src[r * stride + col + c] as f64;
    for_each_sample(dst, width, height, m, |out, xi, yi, dx, dy| {
        let col = |x: i64| x.clamp(0, wi - 1) as usize * CH;
        let row_ok = |r: i64| r >= 0 && r < hi;
        if CUBIC {
            // Taps at xi-1..xi+2 (clamped) and rows yi-1..yi+2; a row below the image
            // repeats the one before it, the first is clamped.
            let cx = [col(xi - 1), col(xi), col(xi + 1), col(xi + 2)];
            let r0 = (yi - 1).clamp(0, hi - 1) as usize;
            for (c, o) in out.iter_mut().enumerate() {
                let h = |r: usize| {
                    if PASSES == 2 {
                        px(r, cx[1], c)
                    } else {
                        cubic(
                            px(r, cx[0], c),
                            px(r, cx[1], c),
                            px(r, cx[2], c),
                            px(r, cx[3], c),
                            dx,
                        )
                    }
                };
                let v = if PASSES == 1 {
                    h(yi as usize)
                } else {
                    let v1 = h(r0);
                    let v2 = if row_ok(yi) { h(yi as usize) } else { v1 };
                    let v3 = if row_ok(yi + 1) {
                        h((yi + 1) as usize)
                    } else {
                        v2
                    };
                    let v4 = if row_ok(yi + 2) {
                        h((yi + 2) as usize)
                    } else {
                        v3
                    };
                    cubic(v1, v2, v3, v4, dy)
                };
                *o = v.clamp(0.0, 255.0) as u8;
            }
        } else {
            let (x0, x1) = (col(xi), col(xi + 1));
            let r0 = yi.clamp(0, hi - 1) as usize;
            let lerp = |a: f64, b: f64, d: f64| a + (b - a) * d;
            for (c, o) in out.iter_mut().enumerate() {
                let h = |r: usize| {
                    if PASSES == 2 {
                        px(r, x0, c)
                    } else {
                        lerp(px(r, x0, c), px(r, x1, c), dx)
                    }
                };
                let v = if PASSES == 1 {
                    h(r0)
                } else {
                    let v1 = h(r0);
                    let v2 = if row_ok(yi + 1) {
                        h((yi + 1) as usize)
                    } else {
                        v1
                    };
                    lerp(v1, v2, dy)
                };
                *o = v as u8;
            }
        }
    });
}

/// Python's `round(x, 15)` (correctly rounded through the shortest decimal form, as
/// `Image.rotate` rounds its matrix).
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// The matrix `Image.rotate(degrees)` uses (about the image centre, no expansion), or `None`
/// when Pillow returns the image unchanged (an angle of 0 modulo 360).
pub fn rotate_matrix(degrees: f64, width: usize, height: usize) -> Option<AffineMatrix> {
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return None;
    }
    let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
    let a = -angle.to_radians();
    let (cos, sin) = (round15(a.cos()), round15(a.sin()));
    let mut m = [cos, sin, 0.0, -sin, cos, 0.0];
    // The centre maps to itself: translate by -centre, rotate, translate back.
    m[2] += m[0] * -cx + m[1] * -cy;
    m[5] += m[3] * -cx + m[4] * -cy;
    m[2] += cx;
    m[5] += cy;
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * CH).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn point_ops_follow_their_formulas() {
        let mut img: Vec<u8> = (0..=255).collect();
        invert(&mut img);
        assert_eq!(img[0], 255);
        let mut img: Vec<u8> = (0..=255).collect();
        posterize(&mut img, 2);
        assert_eq!((img[63], img[64], img[255]), (0, 64, 192));
        let mut img: Vec<u8> = (0..=255).collect();
        solarize(&mut img, 128);
        assert_eq!((img[127], img[128], img[255]), (127, 127, 0));
        let mut img: Vec<u8> = (0..=255).collect();
        solarize_add(&mut img, 110, 128);
        assert_eq!((img[0], img[127], img[128]), (110, 237, 128));
    }

    #[test]
    fn identity_transform_copies() {
        let (w, h) = (9, 7);
        let src = ramp(w, h);
        for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for f in [affine, affine_exact] {
                let mut dst = vec![0; src.len()];
                f(
                    &src,
                    &mut dst,
                    w,
                    h,
                    [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                    interp,
                    [1, 2, 3],
                );
                assert_eq!(dst, src, "{interp:?}");
            }
        }
    }

    #[test]
    fn fast_paths_equal_the_full_filter() {
        let (w, h) = (13, 11);
        let src = ramp(w, h);
        let matrices = [
            [1.0, 0.21, 0.0, 0.0, 1.0, 0.0],
            [1.0, -0.3, 0.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, 3.7, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, 0.17, 1.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 1.0, -4.2],
        ];
        for m in matrices {
            let mut fast = vec![0; src.len()];
            let mut full = vec![0; src.len()];
            affine_exact(&src, &mut fast, w, h, m, Interpolation::Bicubic, [0; 3]);
            exact_with::<true, 3>(&src, &mut full, w, h, m);
            assert_eq!(fast, full, "bicubic {m:?}");
            affine_exact(&src, &mut fast, w, h, m, Interpolation::Bilinear, [0; 3]);
            exact_with::<false, 3>(&src, &mut full, w, h, m);
            assert_eq!(fast, full, "bilinear {m:?}");
        }
    }

    /// The fast filter against Pillow's exact arithmetic on a 96x80 noisy image, for
    /// rotations, shears and translations: at most one level apart, and rarely.
    #[test]
    fn fast_affine_stays_within_a_level_of_exact() {
        let (w, h) = (96, 80);
        let mut rng = crate::rng::Rng::new(5);
        let src: Vec<u8> = (0..w * h * CH).map(|_| rng.below(256) as u8).collect();
        let mut matrices = vec![
            [1.0, 0.23, 0.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, -17.3, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, -0.29, 1.0, 0.0],
        ];
        for deg in [3.7, -21.0, 29.9] {
            matrices.push(rotate_matrix(deg, w, h).unwrap());
        }
        for m in matrices {
            for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
                let mut fast = vec![0; src.len()];
                let mut exact = vec![0; src.len()];
                affine(&src, &mut fast, w, h, m, interp, [9; 3]);
                affine_exact(&src, &mut exact, w, h, m, interp, [9; 3]);
                let off = fast.iter().zip(&exact).filter(|(a, b)| a != b).count();
                let max = fast.iter().zip(&exact).map(|(a, b)| a.abs_diff(*b)).max();
                // Both truncate: a value within rounding error of an integer can land one
                // level apart. With "round" shifts (17.3 px: bilinear weights 0.7 / 0.3 on
                // integers) that happens for a few per cent of the bytes.
                assert!(max <= Some(1), "{m:?} {interp:?}: max {max:?}");
                assert!(
                    off * 10 < fast.len(),
                    "{m:?} {interp:?}: {off} bytes differ"
                );
            }
        }
    }

    #[test]
    fn rotation_keeps_the_centre() {
        let m = rotate_matrix(30.0, 10, 10).unwrap();
        let (x, y) = (5.0, 5.0);
        assert!((m[0] * x + m[1] * y + m[2] - 5.0).abs() < 1e-12);
        assert!((m[3] * x + m[4] * y + m[5] - 5.0).abs() < 1e-12);
        assert!(rotate_matrix(0.0, 10, 10).is_none());
        assert!(rotate_matrix(-0.0, 10, 10).is_none());
    }
}
