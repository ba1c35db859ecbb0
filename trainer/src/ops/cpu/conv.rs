//! Channels-last f32 convolutions on the CPU: forward, backward data and backward filter as
//! GEMMs over image-to-column tiles (the `gemm` crate's kernels, the ones candle uses).
//!
//! Layouts: input `[N, H, W, C]`, output `[N, OH, OW, K]`, filter OIHW (`[K, Cg, R, R]`, as
//! PyTorch and candle keep it), run as `[G][R * S * Cg][Kg]` ("RSCK" per group, `Cg = C / G`, `Kg = K / G`), so an output pixel's values for a group are
//! the product of its patch (`R * S * Cg` values, in (r, s, c) order) and the group's filter.
//!
//! * Forward: the `M = N * OH * OW` output pixels are cut into tiles of [`TILE`] rows; each tile
//!   gathers its patches into a buffer (a 1x1 stride-1 convolution reads the input rows directly)
//!   and runs one GEMM per group. Tiles run on rayon's pool, each GEMM single-threaded.
//! * Backward data: stride 1 is the forward convolution of the output gradient with the
//!   flipped, transposed filter (padding `R - 1 - pad`); a 1x1 convolution is a GEMM scattered
//!   to the strided input pixels; other strides compute the patch gradients tile by tile and
//!   gather each input pixel's contributions (no two tasks write one value).
//! * Backward filter: per tile, patches^T x output gradient into a partial filter gradient; the
//!   partials are added in tile order.
//!
//! * Depthwise (one group per channel, `K = C`: EfficientNet's 3x3 and 5x5 convs): a GEMM per group would be one column wide, so these run as direct loops over
//!   the taps, vectorised across the channels (the innermost, contiguous dimension): the forward
//!   and the input gradient gather per output or input pixel, the filter gradient sums per tile
//!   of [`DW_TILE`] output pixels into partials added in tile order.
//!
//! Tiles depend only on the problem size, never on the number of threads, and every sum has one
//! order: the results are the same bits for any thread count.

use rayon::prelude::*;

use crate::ops::Activation;

/// Output rows per tile.
pub const TILE: usize = 2048;

/// Pixels per task of the depthwise kernels.
pub const DW_TILE: usize = 256;

/// Convolution geometry (square kernel, the same stride and padding on both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub k: usize,
    /// Kernel side.
    pub r: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding.
    pub pad: usize,
    /// Groups.
    pub groups: usize,
}

impl ConvGeom {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad - self.r) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    /// Output pixels `N * OH * OW`.
    pub fn m(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * oh * ow
    }

    fn cg(&self) -> usize {
        self.c / self.groups
    }

    fn kg(&self) -> usize {
        self.k / self.groups
    }

    /// Patch length per group, `R * R * Cg`.
    pub fn patch(&self) -> usize {
        self.r * self.r * self.cg()
    }

    fn is_pointwise(&self) -> bool {
        self.r == 1 && self.pad == 0
    }

    /// One group per channel and one output channel per group: the filter is `[C][R * R]`
    /// both as OIHW and as RSCK per group.
    fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.c && self.k == self.c
    }
}

/// `[C][T]` filter taps as `[T][C]`, so that a tap's weights for all channels are contiguous.
fn taps_major(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0f32; c * taps];
    for ch in 0..c {
        for t in 0..taps {
            out[t * c + ch] = w[ch * taps + t];
        }
    }
    out
}

/// Calls `f(tap, input pixel)` for each tap of output pixel `(n, oy, ox)` that falls inside the
/// image (taps in row-major order; the pixel as an index into `[N, H, W]`).
#[inline]
fn taps_inside(geo: &ConvGeom, n: usize, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
    let inside = |o: usize, k: usize, len: usize| {
        (o * geo.stride + k)
            .checked_sub(geo.pad)
            .filter(|&v| v < len)
    };
    for ky in 0..geo.r {
        let Some(iy) = inside(oy, ky, geo.h) else {
            continue;
        };
        for kx in 0..geo.r {
            if let Some(ix) = inside(ox, kx, geo.w) {
                f(ky * geo.r + kx, (n * geo.h + iy) * geo.w + ix);
            }
        }
    }
}

/// The depthwise forward: `y[n, oy, ox, c] = sum over taps of x[n, iy, ix, c] * w[c, tap]`
/// (taps in row-major order, padding taps skipped), then the epilogue.
fn depthwise_forward(
    x: &[f32],
    geo: &ConvGeom,
    w: &[f32],
    y: &mut [f32],
    epilogue: Option<&Epilogue<'_>>,
) {
    let (oh, ow) = geo.out_hw();
    let (c, r) = (geo.c, geo.r);
    let wt = taps_major(w, c, r * r);
    y.par_chunks_mut(DW_TILE * c)
        .enumerate()
        .for_each(|(t, out)| {
            let m0 = t * DW_TILE;
            for (i, o) in out.chunks_exact_mut(c).enumerate() {
                let mi = m0 + i;
                let (n, oy, ox) = (mi / (oh * ow), mi / ow % oh, mi % ow);
                o.fill(0.0);
                taps_inside(geo, n, oy, ox, |tap, pix| {
                    let xr = &x[pix * c..][..c];
                    let wr = &wt[tap * c..][..c];
                    for ((o, &a), &b) in o.iter_mut().zip(xr).zip(wr) {
                        *o += a * b;
                    }
                });
            }
            if let Some(e) = epilogue {
                e.apply(m0, c, out);
            }
        });
}

/// The depthwise input gradient: each input pixel gathers `dy * w` over the output pixels whose
/// windows hold it (no two tasks write one value).
fn depthwise_backward_data(dy: &[f32], geo: &ConvGeom, w: &[f32], dx: &mut [f32]) {
    let (oh, ow) = geo.out_hw();
    let (h, wd, c, r, st, p) = (geo.h, geo.w, geo.c, geo.r, geo.stride, geo.pad);
    let wt = taps_major(w, c, r * r);
    // The output index of input index `i` through tap `k`, if any.
    let out_of = |i: usize, k: usize, len: usize| -> Option<usize> {
        let v = (i + p).checked_sub(k)?;
        (v % st == 0 && v / st < len).then_some(v / st)
    };
    dx.par_chunks_mut(DW_TILE * c)
        .enumerate()
        .for_each(|(t, out)| {
            let p0 = t * DW_TILE;
            for (i, o) in out.chunks_exact_mut(c).enumerate() {
                let pi = p0 + i;
                let (n, iy, ix) = (pi / (h * wd), pi / wd % h, pi % wd);
                o.fill(0.0);
                for ky in 0..r {
                    let Some(oy) = out_of(iy, ky, oh) else {
                        continue;
                    };
                    for kx in 0..r {
                        let Some(ox) = out_of(ix, kx, ow) else {
                            continue;
                        };
                        let gr = &dy[((n * oh + oy) * ow + ox) * c..][..c];
                        let wr = &wt[(ky * r + kx) * c..][..c];
                        for ((o, &a), &b) in o.iter_mut().zip(gr).zip(wr) {
                            *o += a * b;
                        }
                    }
                }
            }
        });
}

/// The depthwise filter gradient `[C][R * R]`: per tile of output pixels a partial `[taps][C]`,
/// the partials added in tile order.
fn depthwise_backward_filter(x: &[f32], dy: &[f32], geo: &ConvGeom, dw: &mut [f32]) {
    let (oh, ow) = geo.out_hw();
    let (c, r) = (geo.c, geo.r);
    let taps = r * r;
    let m = geo.m();
    let partials: Vec<Vec<f32>> = (0..m.div_ceil(DW_TILE))
        .into_par_iter()
        .map(|t| {
            let mut part = vec![0f32; taps * c];
            for mi in t * DW_TILE..m.min((t + 1) * DW_TILE) {
                let (n, oy, ox) = (mi / (oh * ow), mi / ow % oh, mi % ow);
                let gr = &dy[mi * c..][..c];
                taps_inside(geo, n, oy, ox, |tap, pix| {
                    let xr = &x[pix * c..][..c];
                    let acc = &mut part[tap * c..][..c];
                    for ((a, &g), &v) in acc.iter_mut().zip(gr).zip(xr) {
                        *a += g * v;
                    }
                });
            }
            part
        })
        .collect();
    let mut sum = vec![0f32; taps * c];
    for part in &partials {
        for (s, &v) in sum.iter_mut().zip(part) {
            *s += v;
        }
    }
    for ch in 0..c {
        for t in 0..taps {
            dw[ch * taps + t] = sum[t * c + ch];
        }
    }
}

/// A matrix operand: its first element and its strides (between rows, between columns).
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    row: usize,
    col: usize,
}

impl Mat {
    /// A row-major matrix with `ld` elements between rows.
    fn rows(ptr: *const f32, ld: usize) -> Self {
        Mat {
            ptr,
            row: ld,
            col: 1,
        }
    }

    /// The transpose of a row-major matrix with `ld` elements between rows.
    fn transposed(ptr: *const f32, ld: usize) -> Self {
        Mat {
            ptr,
            row: 1,
            col: ld,
        }
    }
}

/// Parallel tasks a convolution aims for: with fewer tiles than this, each tile's GEMM runs on
/// all threads (the late layers of a network have few output pixels and wide GEMMs).
const TASKS: usize = 16;

/// Whether the GEMMs of a convolution with `tiles` tiles run multi-threaded. The `gemm` crate
/// splits a multi-threaded GEMM over blocks of output rows and columns, each output's sum in
/// the same order (its `k` blocking does not depend on the threads), so the results are the
/// same for any thread count; it shares the packed operands between threads, which cutting the
/// GEMM into independent pieces would pack once per piece.
fn threaded(tiles: usize) -> bool {
    tiles < TASKS
}

/// `out = a x b` (`a`: `m x k`, `b`: `k x n`, any strides; `out`: `m x n` row-major with `ldo`
/// elements between rows), or `out += a x b` when `accumulate`; on rayon's threads when
/// `threaded`, else on the caller's.
///
/// # Safety
/// The pointers cover the matrices their strides and sizes describe.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    out: *mut f32,
    ldo: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    threaded: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // gemm: dst = alpha * dst + beta * lhs * rhs; strides given column first, then row.
    gemm::gemm(
        m,
        n,
        k,
        out,
        1,
        ldo as isize,
        accumulate,
        a.ptr,
        a.col as isize,
        a.row as isize,
        b.ptr,
        b.col as isize,
        b.row as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        if threaded {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        },
    );
}

/// Fills `buf` (`rows x patch`) with the patches of output pixels `m0..m0 + rows` for group
/// `g` (zeros where the window leaves the image).
fn gather(x: &[f32], geo: &ConvGeom, g: usize, m0: usize, rows: usize, buf: &mut [f32]) {
    let (oh, ow) = geo.out_hw();
    let (cg, r, c) = (geo.cg(), geo.r, geo.c);
    let patch = geo.patch();
    for (i, dst) in buf[..rows * patch].chunks_exact_mut(patch).enumerate() {
        let m = m0 + i;
        let (n, rest) = (m / (oh * ow), m % (oh * ow));
        let (oy, ox) = (rest / ow, rest % ow);
        for ky in 0..r {
            let iy = (oy * geo.stride + ky) as isize - geo.pad as isize;
            for kx in 0..r {
                let ix = (ox * geo.stride + kx) as isize - geo.pad as isize;
                let d = &mut dst[(ky * r + kx) * cg..(ky * r + kx + 1) * cg];
                if iy < 0 || ix < 0 || iy >= geo.h as isize || ix >= geo.w as isize {
                    d.fill(0.0);
                } else {
                    let at = ((n * geo.h + iy as usize) * geo.w + ix as usize) * c + g * cg;
                    d.copy_from_slice(&x[at..at + cg]);
                }
            }
        }
    }
}

/// A raw pointer that may cross threads (tasks write disjoint parts).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The forward convolution: `y` (`[N, OH, OW, K]`) from `x` (`[N, H, W, C]`) and the OIHW
/// filter `w` (`[K, Cg, R, R]`).
pub fn forward(x: &[f32], geo: &ConvGeom, w: &[f32], y: &mut [f32]) {
    assert_eq!(
        w.len(),
        geo.groups * geo.patch() * geo.kg(),
        "conv filter size"
    );
    forward_rsck(x, geo, &oihw_to_rsck(w, geo), y, None)
}

/// What a convolution adds to each output row while it is still in cache: a shift per output
/// channel (a folded BatchNorm's), then a residual (`[M, K]`, the block's shortcut), then a
/// ReLU.
pub struct Epilogue<'a> {
    /// Per output channel.
    pub shift: &'a [f32],
    /// Added after the shift.
    pub residual: Option<&'a [f32]>,
    /// Applied last (ReLU: `max(0, v)`, a NaN passes).
    pub act: Activation,
}

impl Epilogue<'_> {
    /// Rows `m0..` of the output, `out` (`rows x K`).
    fn apply(&self, m0: usize, k: usize, out: &mut [f32]) {
        let shift = &self.shift[..k];
        let relu = self.act == Activation::Relu;
        for (i, row) in out.chunks_exact_mut(k).enumerate() {
            match self.residual {
                Some(res) => {
                    let res = &res[(m0 + i) * k..(m0 + i + 1) * k];
                    for ((o, &s), &r) in row.iter_mut().zip(shift).zip(res) {
                        let v = (*o + s) + r;
                        *o = if relu && v < 0.0 { 0.0 } else { v };
                    }
                }
                None => {
                    for (o, &s) in row.iter_mut().zip(shift) {
                        let v = *o + s;
                        *o = if relu && v < 0.0 { 0.0 } else { v };
                    }
                }
            }
            if self.act == Activation::Silu {
                super::kernels::silu_in_place(row);
            }
        }
    }
}

/// The filter of an evaluation convolution with a BatchNorm folded in (`y = conv(x, w * scale)
/// + shift`): OIHW `w` times `scale` per output channel, RSCK per group, for
/// [`forward_prepared`].
pub fn folded_filter(w: &[f32], geo: &ConvGeom, scale: &[f32]) -> Vec<f32> {
    assert_eq!(w.len(), geo.k * geo.patch(), "conv filter size");
    assert_eq!(scale.len(), geo.k, "folded scale size");
    rsck_scaled(w, geo, Some(scale))
}

/// The evaluation convolution with the filter already folded ([`folded_filter`]): `epilogue`
/// adds the shift, the residual and the ReLU to each output tile, in one pass.
pub fn forward_prepared(
    x: &[f32],
    geo: &ConvGeom,
    w_rsck: &[f32],
    epilogue: &Epilogue<'_>,
    y: &mut [f32],
) {
    assert_eq!(epilogue.shift.len(), geo.k, "folded shift size");
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), geo.m() * geo.k, "residual size");
    }
    forward_rsck(x, geo, w_rsck, y, Some(epilogue))
}

/// [`forward`] with the filter already RSCK per group, and an optional epilogue.
fn forward_rsck(
    x: &[f32],
    geo: &ConvGeom,
    w: &[f32],
    y: &mut [f32],
    epilogue: Option<&Epilogue<'_>>,
) {
    let m = geo.m();
    let (k, kg, patch, g_count) = (geo.k, geo.kg(), geo.patch(), geo.groups);
    assert_eq!(x.len(), geo.n * geo.h * geo.w * geo.c, "conv input size");
    assert_eq!(w.len(), g_count * patch * kg, "conv filter size");
    assert_eq!(y.len(), m * k, "conv output size");
    if geo.is_depthwise() {
        return depthwise_forward(x, geo, w, y, epilogue);
    }
    let direct = geo.is_pointwise() && geo.stride == 1 && g_count == 1;
    let tiles = m.div_ceil(TILE);
    y.par_chunks_mut(TILE * k)
        .enumerate()
        .for_each_init(Vec::new, |buf, (t, out)| {
            let m0 = t * TILE;
            let rows = out.len() / k;
            if direct {
                // SAFETY: `x` rows m0.. are the patches (C = patch), `w` is patch x k.
                unsafe {
                    matmul(
                        (rows, k, patch),
                        out.as_mut_ptr(),
                        k,
                        Mat::rows(x[m0 * geo.c..].as_ptr(), geo.c),
                        Mat::rows(w.as_ptr(), kg),
                        false,
                        threaded(tiles),
                    )
                };
                if let Some(e) = epilogue {
                    e.apply(m0, k, out);
                }
                return;
            }
            buf.resize(rows * patch, 0.0);
            for g in 0..g_count {
                gather(x, geo, g, m0, rows, buf);
                // SAFETY: buf is rows x patch; the group's filter is patch x kg; the output
                // columns g*kg.. of each row (row stride k).
                unsafe {
                    matmul(
                        (rows, kg, patch),
                        out[g * kg..].as_mut_ptr(),
                        k,
                        Mat::rows(buf.as_ptr(), patch),
                        Mat::rows(w[g * patch * kg..].as_ptr(), kg),
                        false,
                        threaded(tiles),
                    )
                };
            }
            if let Some(e) = epilogue {
                e.apply(m0, k, out);
            }
        });
}

/// The input gradient `dx` (`[N, H, W, C]`) from the output gradient `dy` (`[N, OH, OW, K]`)
/// and the OIHW filter `w`.
pub fn backward_data(dy: &[f32], geo: &ConvGeom, w: &[f32], dx: &mut [f32]) {
    let (oh, ow) = geo.out_hw();
    let (c, k, cg, kg, patch, g_count) =
        (geo.c, geo.k, geo.cg(), geo.kg(), geo.patch(), geo.groups);
    assert_eq!(dy.len(), geo.m() * k, "conv output gradient size");
    assert_eq!(
        dx.len(),
        geo.n * geo.h * geo.w * c,
        "conv input gradient size"
    );
    if geo.is_depthwise() {
        return depthwise_backward_data(dy, geo, w, dx);
    }
    if geo.stride == 1 && geo.pad < geo.r {
        // dx = conv(dy, flipped w^T), padding r - 1 - pad: a forward convolution K -> C.
        let t = ConvGeom {
            n: geo.n,
            h: oh,
            w: ow,
            c: k,
            k: c,
            r: geo.r,
            stride: 1,
            pad: geo.r - 1 - geo.pad,
            groups: g_count,
        };
        debug_assert_eq!(t.out_hw(), (geo.h, geo.w));
        return forward_rsck(dy, &t, &flipped_from_oihw(w, geo), dx, None);
    }
    let w = &oihw_to_rsck(w, geo);
    if geo.is_pointwise() {
        // 1x1 stride s: dx at (s*oy, s*ox) = dy row x w^T, zero elsewhere.
        dx.fill(0.0);
        let dxp = SendPtr(dx.as_mut_ptr());
        let m = geo.m();
        let tiles = m.div_ceil(TILE);
        (0..tiles).into_par_iter().for_each(|t| {
            // The whole wrapper, not its field (closures capture disjoint fields otherwise).
            let dxp = &dxp;
            let (m0, rows) = (t * TILE, TILE.min(m - t * TILE));
            let mut tmp = vec![0f32; rows * c];
            for g in 0..g_count {
                // SAFETY: dy rows m0.. (stride k, columns g*kg..), w group (cg x kg, stride kg).
                unsafe {
                    matmul(
                        (rows, cg, kg),
                        tmp[g * cg..].as_mut_ptr(),
                        c,
                        Mat::rows(dy[m0 * k + g * kg..].as_ptr(), k),
                        Mat::transposed(w[g * cg * kg..].as_ptr(), kg),
                        false,
                        threaded(tiles),
                    )
                };
            }
            for (i, row) in tmp.chunks_exact(c).enumerate() {
                let mm = m0 + i;
                let (n, rest) = (mm / (oh * ow), mm % (oh * ow));
                let (iy, ix) = ((rest / ow) * geo.stride, (rest % ow) * geo.stride);
                let at = ((n * geo.h + iy) * geo.w + ix) * c;
                // SAFETY: each output pixel maps to its own input pixel (stride >= 1, 1x1).
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dxp.0.add(at), c) };
            }
        });
        return;
    }
    // General case: the patch gradients of every output pixel, then a gather per input pixel.
    let m = geo.m();
    let tiles = m.div_ceil(TILE);
    let mut dcol = vec![0f32; m * g_count * patch];
    dcol.par_chunks_mut(TILE * g_count * patch)
        .enumerate()
        .for_each(|(t, out)| {
            let m0 = t * TILE;
            let rows = out.len() / (g_count * patch);
            for g in 0..g_count {
                // SAFETY: dy rows (stride k, columns g*kg..) x w group^T (patch x kg).
                unsafe {
                    matmul(
                        (rows, patch, kg),
                        out[g * patch..].as_mut_ptr(),
                        g_count * patch,
                        Mat::rows(dy[m0 * k + g * kg..].as_ptr(), k),
                        Mat::transposed(w[g * patch * kg..].as_ptr(), kg),
                        false,
                        threaded(tiles),
                    )
                };
            }
        });
    let row_len = geo.w * c;
    dx.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, out)| {
            let (n, iy) = (row / geo.h, row % geo.h);
            out.fill(0.0);
            for ky in 0..geo.r {
                let t = iy as isize + geo.pad as isize - ky as isize;
                if t < 0 || t % geo.stride as isize != 0 {
                    continue;
                }
                let oy = (t / geo.stride as isize) as usize;
                if oy >= oh {
                    continue;
                }
                for ix in 0..geo.w {
                    for kx in 0..geo.r {
                        let u = ix as isize + geo.pad as isize - kx as isize;
                        if u < 0 || u % geo.stride as isize != 0 {
                            continue;
                        }
                        let ox = (u / geo.stride as isize) as usize;
                        if ox >= ow {
                            continue;
                        }
                        let mm = (n * oh + oy) * ow + ox;
                        for g in 0..g_count {
                            let src =
                                &dcol[mm * g_count * patch + g * patch + (ky * geo.r + kx) * cg..];
                            let d = &mut out[ix * c + g * cg..ix * c + (g + 1) * cg];
                            for (a, b) in d.iter_mut().zip(&src[..cg]) {
                                *a += *b;
                            }
                        }
                    }
                }
            }
        });
}

/// The filter gradient `dw` (OIHW) from the input `x` and the output gradient `dy`.
pub fn backward_filter(x: &[f32], dy: &[f32], geo: &ConvGeom, dw: &mut [f32]) {
    let mut rsck = vec![0f32; dw.len()];
    backward_filter_rsck(x, dy, geo, &mut rsck);
    dw.copy_from_slice(&rsck_to_oihw(&rsck, geo));
}

/// [`backward_filter`] into a filter RSCK per group.
fn backward_filter_rsck(x: &[f32], dy: &[f32], geo: &ConvGeom, dw: &mut [f32]) {
    let m = geo.m();
    let (k, kg, patch, g_count) = (geo.k, geo.kg(), geo.patch(), geo.groups);
    assert_eq!(dy.len(), m * k, "conv output gradient size");
    assert_eq!(dw.len(), g_count * patch * kg, "conv filter gradient size");
    if geo.is_depthwise() {
        return depthwise_backward_filter(x, dy, geo, dw);
    }
    let direct = geo.is_pointwise() && geo.stride == 1 && g_count == 1;
    let tiles = m.div_ceil(TILE);
    let partials: Vec<Vec<f32>> = (0..tiles)
        .into_par_iter()
        .map_init(Vec::new, |buf, t| {
            let (m0, rows) = (t * TILE, TILE.min(m - t * TILE));
            let mut part = vec![0f32; g_count * patch * kg];
            if direct {
                // SAFETY: x rows (patch = c) ^T x dy rows -> patch x k.
                unsafe {
                    matmul(
                        (patch, k, rows),
                        part.as_mut_ptr(),
                        kg,
                        Mat::transposed(x[m0 * geo.c..].as_ptr(), geo.c),
                        Mat::rows(dy[m0 * k..].as_ptr(), k),
                        false,
                        threaded(tiles),
                    )
                };
                return part;
            }
            buf.resize(rows * patch, 0.0);
            for g in 0..g_count {
                gather(x, geo, g, m0, rows, buf);
                // SAFETY: buf (rows x patch)^T x dy rows (columns g*kg.., stride k).
                unsafe {
                    matmul(
                        (patch, kg, rows),
                        part[g * patch * kg..].as_mut_ptr(),
                        kg,
                        Mat::transposed(buf.as_ptr(), patch),
                        Mat::rows(dy[m0 * k + g * kg..].as_ptr(), k),
                        false,
                        threaded(tiles),
                    )
                };
            }
            part
        })
        .collect();
    // The tiles' partial sums, added in tile order (element-parallel).
    dw.par_chunks_mut(4096).enumerate().for_each(|(i, out)| {
        let (base, len) = (i * 4096, out.len());
        out.copy_from_slice(&partials[0][base..base + len]);
        for p in &partials[1..] {
            for (o, v) in out.iter_mut().zip(&p[base..base + len]) {
                *o += *v;
            }
        }
    });
}

/// `dst[i * cols + j] = src[row_at[i] + col_at[j]]` (times `col_scale[j]` when given) for a
/// `row_at.len() x cols` destination (`cols = col_at.len()`): the filter layout changes as one
/// parallel copy, walked in square blocks so that both sides stay in cache whichever of them is
/// strided.
fn copy_indexed(
    src: &[f32],
    row_at: &[usize],
    col_at: &[usize],
    col_scale: Option<&[f32]>,
    dst: &mut [f32],
) {
    const B: usize = 32;
    let cols = col_at.len();
    assert_eq!(dst.len(), row_at.len() * cols, "filter copy size");
    if cols == 0 {
        return;
    }
    dst.par_chunks_mut(B * cols)
        .zip(row_at.par_chunks(B))
        .for_each(|(out, rows)| {
            for j0 in (0..cols).step_by(B) {
                let j1 = cols.min(j0 + B);
                let js = &col_at[j0..j1];
                for (i, &ra) in rows.iter().enumerate() {
                    let o = &mut out[i * cols + j0..i * cols + j1];
                    match col_scale {
                        Some(sc) => {
                            for ((d, &ca), &s) in o.iter_mut().zip(js).zip(&sc[j0..j1]) {
                                *d = src[ra + ca] * s;
                            }
                        }
                        None => {
                            for (d, &ca) in o.iter_mut().zip(js) {
                                *d = src[ra + ca];
                            }
                        }
                    }
                }
            }
        });
}

/// A PyTorch OIHW filter (`[K, Cg, R, R]`) as RSCK per group: row `(g, ky, kx, ci)`, column
/// `ko` holds `w[g * Kg + ko, ci, ky, kx]`.
pub fn oihw_to_rsck(w: &[f32], geo: &ConvGeom) -> Vec<f32> {
    rsck_scaled(w, geo, None)
}

/// [`oihw_to_rsck`], each output channel `k` times `scale[k]` when given (a folded BatchNorm).
fn rsck_scaled(w: &[f32], geo: &ConvGeom, scale: Option<&[f32]>) -> Vec<f32> {
    let (r, cg, kg, patch) = (geo.r, geo.cg(), geo.kg(), geo.patch());
    let rows: Vec<usize> = (0..patch)
        .map(|p| {
            let (tap, ci) = (p / cg, p % cg);
            ci * r * r + tap
        })
        .collect();
    let cols: Vec<usize> = (0..kg).map(|ko| ko * patch).collect();
    let mut out = vec![0f32; w.len()];
    let per_group = patch * kg;
    for (g, dst) in out.chunks_exact_mut(per_group).enumerate() {
        let src = &w[g * per_group..(g + 1) * per_group];
        let sc = scale.map(|s| &s[g * kg..(g + 1) * kg]);
        copy_indexed(src, &rows, &cols, sc, dst);
    }
    out
}

/// RSCK per group back to OIHW.
pub fn rsck_to_oihw(w: &[f32], geo: &ConvGeom) -> Vec<f32> {
    let (r, cg, kg, patch) = (geo.r, geo.cg(), geo.kg(), geo.patch());
    let rows: Vec<usize> = (0..geo.k)
        .map(|kk| (kk / kg) * patch * kg + kk % kg)
        .collect();
    let cols: Vec<usize> = (0..patch)
        .map(|q| {
            let (ci, tap) = (q / (r * r), q % (r * r));
            (tap * cg + ci) * kg
        })
        .collect();
    let mut out = vec![0f32; w.len()];
    copy_indexed(w, &rows, &cols, None, &mut out);
    out
}

/// The filter of the stride-1 backward data pass, from the OIHW filter: RSCK per group with
/// the roles of C and K exchanged and the taps flipped, row `(g, fy, fx, ko)`, column `ci`
/// holding `w[g * Kg + ko, ci, R - 1 - fy, R - 1 - fx]`.
fn flipped_from_oihw(w: &[f32], geo: &ConvGeom) -> Vec<f32> {
    let (r, cg, kg, patch) = (geo.r, geo.cg(), geo.kg(), geo.patch());
    let rows: Vec<usize> = (0..geo.groups * r * r * kg)
        .map(|row| {
            let (g, rest) = (row / (r * r * kg), row % (r * r * kg));
            let (tap, ko) = (rest / kg, rest % kg);
            (g * kg + ko) * patch + (r * r - 1 - tap)
        })
        .collect();
    let cols: Vec<usize> = (0..cg).map(|ci| ci * r * r).collect();
    let mut out = vec![0f32; w.len()];
    copy_indexed(w, &rows, &cols, None, &mut out);
    out
}
