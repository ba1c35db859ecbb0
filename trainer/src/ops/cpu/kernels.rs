//! Channels-last f32 BatchNorm, pooling and residual-add kernels on the CPU, on rayon's pool.
//!
//! A `[N, H, W, C]` tensor is an `[M, C]` matrix (`M = N * H * W`). Reductions over rows run
//! in chunks of [`ROWS`] rows whose boundaries depend only on `M`; the chunks' f64 partial sums
//! are added in chunk order, so results are the same bits for any thread count. The formulas
//! are those of the CUDA kernels (`cuda::bn`, `cuda::pool`): biased batch variance, running
//! statistics with PyTorch's unbiased variance and momentum, and `dx = a * g + b * (x - mean) + c`
//! in the backward; the output is `(x - mean) * gamma * invstd + beta` (centred first, see
//! [`apply`]).

use rayon::prelude::*;

/// Rows per reduction chunk.
pub const ROWS: usize = 1024;

/// Per-channel sums of `x` and `x^2` over the rows of `[M, C]`, in f64, fixed order.
fn column_sums(x: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let parts: Vec<Vec<f64>> = x
        .par_chunks(ROWS * c)
        .map(|chunk| {
            let mut p = vec![0f64; 2 * c];
            let (s, q) = p.split_at_mut(c);
            for row in chunk.chunks_exact(c) {
                for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
                    let v = v as f64;
                    *s += v;
                    *q += v * v;
                }
            }
            p
        })
        .collect();
    add_parts(&parts, c)
}

/// The chunks' partial sums (`[2][C]` each) added in chunk order: the two per-channel totals.
fn add_parts(parts: &[Vec<f64>], c: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut s, mut q) = (vec![0f64; c], vec![0f64; c]);
    for p in parts {
        for j in 0..c {
            s[j] += p[j];
            q[j] += p[c + j];
        }
    }
    (s, q)
}

/// The batch statistics of a training BatchNorm and what its backward needs.
#[derive(Clone, Debug)]
pub struct BnStats {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// `1 / sqrt(var + eps)` per channel (biased batch variance).
    pub invstd: Vec<f32>,
}

/// Training BatchNorm (+ ReLU) over `x` (`[M, C]`): returns `y` and the batch statistics, and
/// updates `running_mean` / `running_var` (momentum, unbiased variance, as PyTorch).
#[allow(clippy::too_many_arguments)]
pub fn bn_train_forward(
    x: &[f32],
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    momentum: f64,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    relu: bool,
) -> (Vec<f32>, BnStats) {
    let m = x.len() / c;
    let (s, q) = column_sums(x, c);
    let mut mean = vec![0f32; c];
    let mut invstd = vec![0f32; c];
    let mut scale = vec![0f32; c];
    let mom = momentum as f32;
    for j in 0..c {
        let dm = s[j] / m as f64;
        let var = (q[j] / m as f64 - dm * dm).max(0.0);
        mean[j] = dm as f32;
        invstd[j] = 1.0 / ((var as f32) + eps as f32).sqrt();
        let unbiased = (var * m as f64 / (m.max(2) - 1) as f64) as f32;
        running_mean[j] = running_mean[j] * (1.0 - mom) + mean[j] * mom;
        running_var[j] = running_var[j] * (1.0 - mom) + unbiased * mom;
        scale[j] = gamma[j] * invstd[j];
    }
    let y = apply(x, c, &mean, &scale, beta, relu);
    (y, BnStats { mean, invstd })
}

/// `y = (x - mean) * scale + beta` per channel (+ ReLU). Centring first keeps f32 rounding
/// relative to the output even when the mean is large against the spread (folding `mean` into
/// the shift would lose it: at mean 50 the folded form is off by about 3e-6 relative).
pub fn apply(
    x: &[f32],
    c: usize,
    mean: &[f32],
    scale: &[f32],
    beta: &[f32],
    relu: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let (mean, scale, beta) = (&mean[..c], &scale[..c], &beta[..c]);
    y.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .for_each(|(yo, xi)| {
            for (yr, xr) in yo.chunks_exact_mut(c).zip(xi.chunks_exact(c)) {
                let per_channel = mean.iter().zip(scale).zip(beta);
                for ((y, &x), ((&m, &s), &b)) in yr.iter_mut().zip(xr).zip(per_channel) {
                    let v = (x - m) * s + b;
                    *y = if relu { relu_keep_nan(v) } else { v };
                }
            }
        });
    y
}

/// `max(v, 0)` that lets a NaN through (`f32::max` would turn it into 0 and hide a diverged
/// step).
#[inline(always)]
fn relu_keep_nan(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// The output gradient through the fused ReLU: `dy` where the output is positive, else 0 (not
/// `y <= 0`: a NaN output passes no gradient, as on the GPU).
#[inline(always)]
fn through_relu(y: f32, dy: f32) -> f32 {
    if y > 0.0 {
        dy
    } else {
        0.0
    }
}

/// The backward of [`bn_train_forward`]: `(dx, dgamma, dbeta)` from the input `x`, the output
/// `y` (read only with the fused ReLU, for its mask), the statistics and the output gradient.
pub fn bn_train_backward(
    x: &[f32],
    y: Option<&[f32]>,
    dy: &[f32],
    c: usize,
    gamma: &[f32],
    st: &BnStats,
    relu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = x.len() / c;
    if relu && y.is_none() {
        panic!("batch norm backward: the fused ReLU needs the forward's output");
    }
    let (mean, invstd, gamma) = (&st.mean[..c], &st.invstd[..c], &gamma[..c]);
    // Row `row`'s output gradient after the ReLU, into `g`.
    let grad_row = |row: usize, g: &mut [f32]| {
        let d = &dy[row * c..(row + 1) * c];
        match y {
            Some(y) if relu => {
                for ((g, &d), &y) in g.iter_mut().zip(d).zip(&y[row * c..(row + 1) * c]) {
                    *g = through_relu(y, d);
                }
            }
            _ => g.copy_from_slice(d),
        }
    };
    let parts: Vec<Vec<f64>> = (0..m.div_ceil(ROWS))
        .into_par_iter()
        .map(|t| {
            let mut p = vec![0f64; 2 * c];
            let mut g = vec![0f32; c];
            let (gs, hs) = p.split_at_mut(c);
            for row in t * ROWS..((t + 1) * ROWS).min(m) {
                grad_row(row, &mut g);
                let xr = &x[row * c..(row + 1) * c];
                let stats = mean.iter().zip(invstd);
                let sums = gs.iter_mut().zip(hs.iter_mut());
                for (((&g, &x), (&mu, &is)), (gs, hs)) in g.iter().zip(xr).zip(stats).zip(sums) {
                    let xhat = ((x - mu) * is) as f64;
                    *gs += g as f64;
                    *hs += g as f64 * xhat;
                }
            }
            p
        })
        .collect();
    let (gs, hs) = add_parts(&parts, c);
    let dbeta: Vec<f32> = gs.iter().map(|&v| v as f32).collect();
    let dgamma: Vec<f32> = hs.iter().map(|&v| v as f32).collect();
    // dx = a * g + b * (x - mean) + c0.
    let inv_m = 1.0 / m as f32;
    let mut a = vec![0f32; c];
    let mut b = vec![0f32; c];
    let mut c0 = vec![0f32; c];
    for j in 0..c {
        let k = gamma[j] * invstd[j];
        a[j] = k;
        b[j] = -k * invstd[j] * (dgamma[j] * inv_m);
        c0[j] = -k * (dbeta[j] * inv_m);
    }
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(ROWS * c)
        .enumerate()
        .for_each(|(t, out)| {
            let mut g = vec![0f32; c];
            for (rr, orow) in out.chunks_exact_mut(c).enumerate() {
                let row = t * ROWS + rr;
                grad_row(row, &mut g);
                let xr = &x[row * c..(row + 1) * c];
                let coef = a.iter().zip(&b).zip(&c0).zip(mean);
                for (((o, &g), &x), (((&a, &b), &c0), &mu)) in
                    orow.iter_mut().zip(&g).zip(xr).zip(coef)
                {
                    *o = a * g + b * (x - mu) + c0;
                }
            }
        });
    (dx, dgamma, dbeta)
}

/// Max-pool `k x k`, stride `s`, padding `p` over `[N, H, W, C]`: the output and, per output
/// value, the window position of its maximum (the first in row-major order; a NaN wins, the
/// last NaN of a window; as the CUDA kernel and PyTorch).
#[allow(clippy::too_many_arguments)]
pub fn max_pool_forward(
    x: &[f32],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    p: usize,
) -> (Vec<f32>, Vec<u8>, usize, usize) {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let mut y = vec![0f32; n * oh * ow * c];
    let mut idx = vec![0u8; n * oh * ow * c];
    y.par_chunks_mut(ow * c)
        .zip(idx.par_chunks_mut(ow * c))
        .enumerate()
        .for_each(|(row, (yr, ir))| {
            let (b, oy) = (row / oh, row % oh);
            for ox in 0..ow {
                let best = &mut yr[ox * c..(ox + 1) * c];
                let bi = &mut ir[ox * c..(ox + 1) * c];
                let mut first = true;
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - p as isize;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let at = ((b * h + iy as usize) * w + ix as usize) * c;
                        let px = &x[at..at + c];
                        let pos = (ky * k + kx) as u8;
                        if first {
                            best.copy_from_slice(px);
                            bi.fill(pos);
                            first = false;
                            continue;
                        }
                        // Selects rather than branches (vectorised).
                        for ((m, i), &v) in best.iter_mut().zip(bi.iter_mut()).zip(px) {
                            let take = v > *m || v.is_nan();
                            *m = if take { v } else { *m };
                            *i = if take { pos } else { *i };
                        }
                    }
                }
            }
        });
    (y, idx, oh, ow)
}

/// The backward of [`max_pool_forward`]: each input value gathers the gradients of the
/// outputs whose maximum it was.
#[allow(clippy::too_many_arguments)]
pub fn max_pool_backward(
    dy: &[f32],
    idx: &[u8],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    p: usize,
) -> Vec<f32> {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let mut dx = vec![0f32; n * h * w * c];
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, out)| {
        let (b, iy) = (row / h, row % h);
        let lo_h = iy as isize + p as isize - k as isize + 1;
        let oy0 = if lo_h <= 0 {
            0
        } else {
            (lo_h as usize).div_ceil(s)
        };
        let oy1 = ((iy + p) / s).min(oh - 1);
        for ix in 0..w {
            let lo_w = ix as isize + p as isize - k as isize + 1;
            let ox0 = if lo_w <= 0 {
                0
            } else {
                (lo_w as usize).div_ceil(s)
            };
            let ox1 = ((ix + p) / s).min(ow - 1);
            let d = &mut out[ix * c..(ix + 1) * c];
            for oy in oy0..=oy1 {
                for ox in ox0..=ox1 {
                    let o = ((b * oh + oy) * ow + ox) * c;
                    let want = ((iy + p - oy * s) * k + (ix + p - ox * s)) as u8;
                    for j in 0..c {
                        if idx[o + j] == want {
                            d[j] += dy[o + j];
                        }
                    }
                }
            }
        }
    });
    dx
}

/// The number of real pixels in output row/column `o` of a 2x2 stride-2 ceil-mode pool over
/// `len` pixels (1 for the last one of an odd length, else 2).
#[inline]
fn pool2_span(o: usize, len: usize) -> usize {
    if 2 * o + 1 < len {
        2
    } else {
        1
    }
}

/// ResNet-D's shortcut pool, `nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`,
/// `[N, H, W, C]` -> `[N, ceil(H/2), ceil(W/2), C]`: each output pixel the mean of the (up to
/// four) input pixels of its window, summed row by row.
pub fn avg_pool2_ceil_forward(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let mut y = vec![0f32; n * oh * ow * c];
    y.par_chunks_mut(ow * c).enumerate().for_each(|(row, out)| {
        let (b, oy) = (row / oh, row % oh);
        let hs = pool2_span(oy, h);
        for (ox, o) in out.chunks_exact_mut(c).enumerate() {
            let ws = pool2_span(ox, w);
            for dy in 0..hs {
                for dx in 0..ws {
                    let px = ((b * h + 2 * oy + dy) * w + 2 * ox + dx) * c;
                    for (o, v) in o.iter_mut().zip(&x[px..px + c]) {
                        *o += v;
                    }
                }
            }
            let inv = 1.0 / (hs * ws) as f32;
            for o in o.iter_mut() {
                *o *= inv;
            }
        }
    });
    y
}

/// The backward of [`avg_pool2_ceil_forward`]: every input pixel gets its window's gradient
/// over the window's pixel count (the windows do not overlap).
pub fn avg_pool2_ceil_backward(dy: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let mut dx = vec![0f32; n * h * w * c];
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, out)| {
        let (b, iy) = (row / h, row % h);
        let oy = iy / 2;
        let hs = pool2_span(oy, h);
        for (ix, o) in out.chunks_exact_mut(c).enumerate() {
            let ox = ix / 2;
            let inv = 1.0 / (hs * pool2_span(ox, w)) as f32;
            let g = &dy[((b * oh + oy) * ow + ox) * c..][..c];
            for (o, g) in o.iter_mut().zip(g) {
                *o = g * inv;
            }
        }
    });
    dx
}

/// Elements per parallel task of the element-wise kernels (SiLU, the add).
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `e^x` in f32 within about 2 ulp (Cody-Waite reduction to `r = x - n ln 2`, Cephes' `expf`
/// polynomial, `2^n` from the exponent bits), branch-free so that loops over it vectorise
/// (libm's `expf` is a call per element). The input is clamped to `[-87, 88]` so that `2^n` is a
/// normal number; a NaN passes through.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    #[allow(clippy::manual_clamp)] // `clamp` would not pass a NaN through
    let x = if x > 88.0 {
        88.0
    } else if x < -87.0 {
        -87.0
    } else {
        x
    };
    // round(x / ln 2): adding and removing 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 = 0.693359375 - 2.12194440e-4: n * the first part is exact.
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    #[allow(clippy::excessive_precision)] // Cephes' coefficients as published
    let p = ((((1.987_569_150_0e-4 * r + 1.398_199_950_7e-3) * r + 8.333_451_907_3e-3) * r
        + 4.166_579_589_4e-2)
        * r
        + 1.666_666_545_9e-1)
        * r
        + 5.000_000_120_1e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Defines `$name`, which runs `$body` (a closure over slices) compiled for AVX2 where the CPU
/// has it (eight lanes instead of SSE2's four), and `$portable`, the same body for the baseline
/// target. Both run the same operations in the same order (no FMA), so they give the same bits
/// (`tests::avx2_and_portable_give_the_same_bits`).
macro_rules! with_avx2 {
    ($name:ident, $portable:ident, ($($arg:ident: $ty:ty),*), $body:expr) => {
        #[inline(always)]
        fn $portable($($arg: $ty),*) {
            $body($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

with_avx2!(silu_slice, silu_slice_portable, (v: &mut [f32]), |v: &mut [f32]| {
    for x in v.iter_mut() {
        *x *= sigmoid_f32(*x);
    }
});

with_avx2!(
    silu_grad_slice,
    silu_grad_slice_portable,
    (x: &[f32], dy: &[f32], dx: &mut [f32]),
    |x: &[f32], dy: &[f32], dx: &mut [f32]| {
        for ((o, &x), &d) in dx.iter_mut().zip(x).zip(dy) {
            let s = sigmoid_f32(x);
            *o = d * (s * (1.0 + x * (1.0 - s)));
        }
    }
);

/// SiLU in place, `v * sigmoid(v)` (one thread: an epilogue's row).
pub fn silu_in_place(v: &mut [f32]) {
    silu_slice(v)
}

/// SiLU, `x * sigmoid(x)`, in parallel chunks.
pub fn silu_forward(x: &[f32]) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(ELEMENTWISE_CHUNK).for_each(silu_slice);
    y
}

/// The SiLU gradient `dy * s (1 + x (1 - s))`, `s = sigmoid(x)`, from the input.
pub fn silu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            x.par_chunks(ELEMENTWISE_CHUNK)
                .zip(dy.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(o, (x, d))| silu_grad_slice(x, d, o));
    dx
}

/// Pixels per parallel task of [`channel_scale_forward`] and the `dx` of its backward.
const SCALE_PIXELS: usize = 64;

/// Channel attention's gate: `y[b, p, c] = x[b, p, c] * g[b, c]` over the `hw` pixels of each
/// of the `n` samples (squeeze-excite, ECA).
pub fn channel_scale_forward(x: &[f32], g: &[f32], hw: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(hw * c)
        .zip(x.par_chunks(hw * c))
        .zip(g.par_chunks(c))
        .for_each(|((ys, xs), g)| {
            ys.par_chunks_mut(SCALE_PIXELS * c)
                .zip(xs.par_chunks(SCALE_PIXELS * c))
                .for_each(|(ys, xs)| {
                    for (yp, xp) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                        for ((y, x), g) in yp.iter_mut().zip(xp).zip(g) {
                            *y = x * g;
                        }
                    }
                });
        });
    y
}

/// The backward of [`channel_scale_forward`]: `dx = dy * g` and `dg[b, c]`, the sum over the
/// sample's pixels of `dy * x` (in pixel order, one task per sample: the same bits for any
/// thread count).
pub fn channel_scale_backward(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    hw: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dx = channel_scale_forward(dy, g, hw, c);
    let mut dg = vec![0f32; g.len()];
    dg.par_chunks_mut(c)
        .zip(x.par_chunks(hw * c).zip(dy.par_chunks(hw * c)))
        .for_each(|(dg, (xs, ds))| {
            for (xp, dp) in xs.chunks_exact(c).zip(ds.chunks_exact(c)) {
                for ((o, x), d) in dg.iter_mut().zip(xp).zip(dp) {
                    *o += x * d;
                }
            }
        });
    (dx, dg)
}

/// Global average pool `[N, HW, C]` -> `[N, C]` (f32 sums in pixel order, then / HW).
pub fn gap_forward(x: &[f32], n: usize, hw: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * c];
    y.par_chunks_mut(c).enumerate().for_each(|(b, out)| {
        for px in x[b * hw * c..(b + 1) * hw * c].chunks_exact(c) {
            for (o, v) in out.iter_mut().zip(px) {
                *o += *v;
            }
        }
        for o in out.iter_mut() {
            *o /= hw as f32;
        }
    });
    y
}

/// The backward of [`gap_forward`]: every pixel gets `dy / HW`.
pub fn gap_backward(dy: &[f32], n: usize, hw: usize, c: usize) -> Vec<f32> {
    let mut dx = vec![0f32; n * hw * c];
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(b, out)| {
        let g: Vec<f32> = dy[b * c..(b + 1) * c]
            .iter()
            .map(|v| v / hw as f32)
            .collect();
        for px in out.chunks_exact_mut(c) {
            px.copy_from_slice(&g);
        }
    });
    dx
}

/// `a + b`, in parallel chunks (the explicit pass: sums where two gradient paths meet, the
/// residual add of blocks without a ReLU after it).
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    y.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            a.par_chunks(ELEMENTWISE_CHUNK)
                .zip(b.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
    y
}

/// `relu(a * scale[sample] + b)` (`scale` per sample, stochastic depth; `None`: `relu(a + b)`).
pub fn add_relu_forward(
    a: &[f32],
    b: &[f32],
    scale: Option<&[f32]>,
    per_sample: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    let per_sample = per_sample.max(1);
    y.par_chunks_mut(per_sample)
        .zip(a.par_chunks(per_sample).zip(b.par_chunks(per_sample)))
        .enumerate()
        .for_each(|(smp, (out, (a, b)))| match scale.map(|s| s[smp]) {
            Some(s) => {
                for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                    *o = relu_keep_nan(a * s + b);
                }
            }
            None => {
                for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                    *o = relu_keep_nan(a + b);
                }
            }
        });
    y
}

/// The backward of [`add_relu_forward`] from its output `y`: `(d_branch, d_shortcut)`.
pub fn add_relu_backward(
    y: &[f32],
    dy: &[f32],
    scale: Option<&[f32]>,
    per_sample: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut ds = vec![0f32; y.len()];
    let mut db = vec![0f32; y.len()];
    let per_sample = per_sample.max(1);
    ds.par_chunks_mut(per_sample)
        .zip(db.par_chunks_mut(per_sample))
        .zip(y.par_chunks(per_sample).zip(dy.par_chunks(per_sample)))
        .enumerate()
        .for_each(|(smp, ((o_s, o_b), (y, dy)))| {
            let s = scale.map_or(1.0, |s| s[smp]);
            for (((o_s, o_b), &y), &d) in o_s.iter_mut().zip(o_b.iter_mut()).zip(y).zip(dy) {
                let g = through_relu(y, d);
                *o_s = g;
                *o_b = g * s;
            }
        });
    (db, ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SiLU kernels' AVX2 build against the baseline build of the same body, bit for bit
    /// (any NaN counting as one value: the sign of a NaN made from a NaN input is the
    /// instruction's), over the useful range, the clamped tails, NaN and the infinities. (On a
    /// CPU without AVX2 both sides are the baseline build.)
    #[test]
    fn avx2_and_portable_give_the_same_bits() {
        let x: Vec<f32> = (0..200_003)
            .map(|i| (i as f32 - 100_000.0) * 0.001_1)
            .chain([
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                87.5,
                -87.5,
                88.5,
                -88.5,
            ])
            .collect();
        let dy: Vec<f32> = (0..x.len())
            .map(|i| ((i % 17) as f32 - 8.0) * 0.37)
            .collect();
        let bits = |v: &[f32]| {
            v.iter()
                .map(|f| if f.is_nan() { u32::MAX } else { f.to_bits() })
                .collect::<Vec<_>>()
        };
        let (mut a, mut b) = (x.clone(), x.clone());
        silu_slice(&mut a);
        silu_slice_portable(&mut b);
        assert!(bits(&a) == bits(&b), "silu: the AVX2 build differs");
        let (mut ga, mut gb) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        silu_grad_slice(&x, &dy, &mut ga);
        silu_grad_slice_portable(&x, &dy, &mut gb);
        assert!(
            bits(&ga) == bits(&gb),
            "silu gradient: the AVX2 build differs"
        );
    }
}
