//! The CUDA kernels of `trainer/src/cuda/bn.rs` (`rsb_batch_norm`) and
//! `trainer/src/cuda/pool.rs` (`rsb_pool`) run on the CPU and are compared with the CPU
//! references of `trainer::ops::nhwc::reference`: a check of the kernels' maths, indexing and launch
//! geometry that needs no GPU and no CUDA toolkit, only `g++` (C++17, ucontext).
//!
//! How: the test reads the kernel sources (and `PRELUDE`) out of the `.rs` files, compiles them
//! as C++ with `kernel_emu/shim.h` (blocks one after another, the threads of a block as fibers
//! that switch at `__syncthreads`) and the generic launcher `kernel_emu/harness.cpp`, and runs a
//! launch script written here. The script replays the Rust launch code of `bn.rs` / `pool.rs`
//! (grid and block dimensions, argument order and types, pointer offsets such as the folded
//! `scale` at `stats + 8 * C` bytes); `launch_code_matches_the_mirror` fails when that Rust code
//! changes. The launcher checks each argument's kind against the kernel's parameter type, fills
//! new buffers with NaN bytes (as `alloc` leaves memory uninitialised) and puts an inaccessible
//! page after every buffer, so an out-of-bounds access fails the test. Without `g++` (or with
//! one too old for C++17) the test prints `skipped: ...` and passes.
//!
//! Inputs are random bf16 values; the references get the same values as f32. Tolerances:
//! * bf16 outputs of f32 maths (BN forward, BN `dx`): `|got - ref| <= 2^-7 |ref| + a * max|ref|`.
//!   `2^-7` covers the one rounding to bf16 (8-bit significand: at most `2^-8` relative, reached
//!   just above a power of two) with a factor 2 margin; the
//!   absolute term `a` (`2^-14` forward, `2^-12` for `dx`) covers the f32 error of the batch
//!   statistics and reductions computed in another order than candle's (sums of a few thousand
//!   f32 terms, about `1e-6` of the scale) and the cancellation in
//!   `g - dbeta / M - xhat * dgamma / M`.
//! * f32 per-channel results: running mean and variance `1e-5` relative (one f32 update of
//!   statistics accurate to about `1e-6`), `dgamma` / `dbeta` `1e-5` of the largest |value| (f32
//!   sums over `M` terms in another order; the kernel totals its chunks in f64).
//! * Exact (bit-equal after rounding the reference to bf16): BN evaluation apply (same f32
//!   operations `x * scale + shift` as candle); max-pool forward (a max) and backward (gradients
//!   are multiples of 1/64 below 4, so every sum is exact in f32 and f64), also with NaN inputs
//!   (a NaN wins its window, as in PyTorch and the CPU op; a NaN output matches any NaN); add +
//!   ReLU forward and backward (pre-activations are never exactly 0: there candle's ReLU gradient
//!   passes, the kernel's and PyTorch's do not).
//! * Global average pool forward (f32): `HW * 2^-23 * max|x|`, the worst-case accumulation error
//!   of `HW` f32 additions in either order; backward `2^-7` relative (`dy / HW` against candle's
//!   `dy * (1 / HW)`, then a bf16 rounding).
//! * Channel attention's gate `x * g[n, c]`: output and `dx` exact (the f32 product of two bf16
//!   values is exact, then one rounding); `dg` (f32 sums of `HW` products) within
//!   `HW * 2^-23 * max|x * dy|` of f64 sums.
//! * SiLU's gradient: `2^-7` relative (one bf16 rounding) plus `2^-12` of the largest gradient
//!   (`expf` and the f32 `1 - s` against candle's SiLU backward in f32).
//!
//! The emulation compiles with `-ffp-contract=off`, so `x * scale + shift` rounds twice as in
//! candle. NVRTC fuses multiply-adds by default: on a GPU `bn_apply` may then differ from the CPU
//! by one bf16 ulp where the f32 product's rounding decides the bf16 rounding, which the GPU test
//! (`cuda_ops.rs`) tolerates; the other bit-equal checks involve no multiply-add.
//!
//! The observed errors are printed (`cargo test -p trainer --test kernel_emu -- --nocapture`).

mod emu;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Result, Tensor, Var};
use trainer::model::BatchNorm2d;
use trainer::ops::nhwc;

// ---------------------------------------------------------------------------------------------
// Mirrors of the launch geometry (bn.rs, pool.rs, kernels.rs); `launch_code_matches_the_mirror`
// pins them.

const TX: usize = 32;
const TY: usize = 8;
const FX: usize = 32;
const FY: usize = 32;

type Cfg = ((usize, usize, usize), (usize, usize, usize));

/// bn.rs `chunking`.
fn chunking(m: usize, c: usize) -> (usize, usize) {
    let col_blocks = c.div_ceil(2 * TX);
    let want = 1024usize
        .div_ceil(col_blocks)
        .clamp(1, m.div_ceil(TY).max(1));
    let rows = m.div_ceil(want);
    (m.div_ceil(rows), rows)
}

/// bn.rs `channel_group_cfg`.
fn channel_group_cfg(m: usize, groups: usize) -> Cfg {
    let threads = 256usize;
    let blocks = (m * groups).div_ceil(threads).clamp(1, 132 * 16);
    ((blocks, 1, 1), (threads, 1, 1))
}

/// bn.rs `finalize_cfg`.
fn finalize_cfg(c: usize) -> Cfg {
    ((c.div_ceil(FX), 1, 1), (FX, FY, 1))
}

/// pool.rs `per_sample_cfg`.
fn per_sample_cfg(per_sample: usize, samples: usize) -> Cfg {
    (
        (per_sample.div_ceil(256).max(1), samples.max(1), 1),
        (256, 1, 1),
    )
}

/// kernels.rs `grid_1d`.
fn grid_1d(n: usize, threads: usize) -> Cfg {
    ((n.div_ceil(threads).max(1), 1, 1), (threads, 1, 1))
}

/// bn.rs: the 2-D launch of the column reductions.
fn reduction_cfg(c: usize, chunks: usize) -> Cfg {
    ((c.div_ceil(2 * TX), chunks, 1), (TX, TY, 1))
}

/// The vector width the Rust code picks (bn.rs `vector_width`, pool.rs `width`): `wide` when
/// `c % 8 == 0` (the emulation's buffers are 16-byte aligned then), else `narrow`.
fn width(c: usize, wide: usize, narrow: usize) -> usize {
    if c.is_multiple_of(8) {
        wide
    } else {
        narrow
    }
}

/// The kernel of width `v`: `NAME_v{v}`.
fn kname(base: &str, v: usize) -> String {
    format!("{base}_v{v}")
}

/// Source text the replayed launches below mirror (compared without whitespace): the geometry
/// helpers, and each launch's arguments and configuration. A change there fails
/// `launch_code_matches_the_mirror` until this file follows it.
const MIRRORED: [(&str, &str); 31] = [
    (
        "src/cuda/bn.rs",
        "const TX: usize = 32; const TY: usize = 8; const FX: usize = 32; const FY: usize = 32;",
    ),
    (
        "src/cuda/bn.rs",
        "let col_blocks = c.div_ceil(2 * TX);
         let want = 1024usize.div_ceil(col_blocks).clamp(1, m.div_ceil(TY).max(1));
         let rows = m.div_ceil(want);
         (m.div_ceil(rows), rows)",
    ),
    (
        "src/cuda/bn.rs",
        "grid_dim: (c.div_ceil(FX) as u32, 1, 1), block_dim: (FX as u32, FY as u32, 1),",
    ),
    (
        "src/cuda/bn.rs",
        "let threads = 256u32;
         let blocks = (m * groups).div_ceil(threads as usize).clamp(1, 132 * 16) as u32;",
    ),
    (
        "src/cuda/bn.rs",
        "if c.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16)) { 8 } else { 2 }",
    ),
    (
        "src/cuda/pool.rs",
        "if c.is_multiple_of(8) && ptrs.iter().all(|p| p.is_multiple_of(16)) { 8 } else { 1 }",
    ),
    (
        "src/cuda/pool.rs",
        "grid_dim: (per_sample.div_ceil(256).max(1) as u32, samples.max(1) as u32, 1),
         block_dim: (256, 1, 1),",
    ),
    (
        "src/cuda/kernels.rs",
        "let blocks = n.div_ceil(threads as usize).max(1) as u32;",
    ),
    // bn.rs, BatchNormTrain::cuda_fwd.
    (
        "src/cuda/bn.rs",
        "b.arg(&xp).arg(&mi).arg(&ci).arg(&ri).arg(&part);
         let cfg = LaunchConfig { grid_dim: (c.div_ceil(2 * TX) as u32, chunks as u32, 1),
         block_dim: (TX as u32, TY as u32, 1),",
    ),
    (
        "src/cuda/bn.rs",
        "b.arg(&xp).arg(&part).arg(&chunks_i).arg(&mi).arg(&ci).arg(&eps).arg(&mom);
         b.arg(&rm).arg(&rv).arg(&gp).arg(&bp).arg(&sp);
         unsafe { b.launch(finalize_cfg(c)) }",
    ),
    (
        "src/cuda/bn.rs",
        "apply(&dev, xp, sp + 8 * c as u64, sp + 12 * c as u64, m, c, self.relu, )?",
    ),
    // bn.rs, apply.
    (
        "src/cuda/bn.rs",
        "let v = vector_width(c, &[x, yp]);
         let f = kernels::func(dev, MODULE, if v == 8 { \"bn_apply_v8\" } else { \"bn_apply_v2\" })?;
         let (mi, ci, ri) = (m as i32, c as i32, relu as i32);
         let mut b = f.builder();
         b.arg(&x).arg(&scale).arg(&shift).arg(&mi).arg(&ci).arg(&ri).arg(&yp);
         unsafe { b.launch(channel_group_cfg(m, c / v)) }",
    ),
    // bn.rs, BatchNormTrain::backward.
    (
        "src/cuda/bn.rs",
        "(Some(y), _) => device_ptr(y)?,
         (None, false) => 0u64,",
    ),
    (
        "src/cuda/bn.rs",
        "b.arg(&xp).arg(&yp).arg(&dyp).arg(&sp).arg(&mi).arg(&ci).arg(&ri).arg(&relu);
         b.arg(&part);
         let cfg = LaunchConfig { grid_dim: (c.div_ceil(2 * TX) as u32, chunks as u32, 1),
         block_dim: (TX as u32, TY as u32, 1),",
    ),
    (
        "src/cuda/bn.rs",
        "b.arg(&part).arg(&chunks_i).arg(&mi).arg(&ci).arg(&sp).arg(&gp);
         b.arg(&dgp).arg(&dbp).arg(&coef);
         unsafe { b.launch(finalize_cfg(c)) }",
    ),
    (
        "src/cuda/bn.rs",
        "let v = vector_width(c, &[xp, yp, dyp, dxp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { \"bn_bwd_dx_v8\" } else { \"bn_bwd_dx_v2\" })?;
         let mut b = f.builder();
         b.arg(&xp).arg(&yp).arg(&dyp).arg(&coef);
         b.arg(&mi).arg(&ci).arg(&relu).arg(&dxp);
         unsafe { b.launch(channel_group_cfg(m, c / v)) }",
    ),
    // pool.rs.
    (
        "src/cuda/pool.rs",
        "let v = width(c, &[xp, yp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { \"maxpool_fwd_v8\" } else { \"maxpool_fwd_v1\" })?;
         let d = [h, w, c, oh, ow, self.kernel, self.stride, self.pad].map(|v| v as i32);
         let mut b = f.builder();
         b.arg(&xp);
         for v in &d { b.arg(v); }
         b.arg(&yp).arg(&ip);
         unsafe { b.launch(per_sample_cfg(oh * ow * c / v, n)?) }",
    ),
    ("src/cuda/pool.rs", "let len = n * h * w * c;"),
    (
        "src/cuda/pool.rs",
        "let v = width(c, &[dyp, dxp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { \"maxpool_bwd_v8\" } else { \"maxpool_bwd_v1\" })?;
         let d = [h, w, c, oh, ow, self.kernel, self.stride, self.pad].map(|v| v as i32);
         let mut b = f.builder();
         b.arg(&dyp).arg(&ip);
         for v in &d { b.arg(v); }
         b.arg(&dxp);
         unsafe { b.launch(per_sample_cfg(h * w * c / v, n)?) }",
    ),
    (
        "src/cuda/pool.rs",
        "let (ni, hwi, ci) = (n as i32, (h * w) as i32, c as i32);
         let mut b = f.builder();
         b.arg(&xp).arg(&ni).arg(&hwi).arg(&ci).arg(&yp);
         unsafe { b.launch(grid_1d(n * c, 256)) }",
    ),
    (
        "src/cuda/pool.rs",
        "let v = width(c, &[dxp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { \"gap_bwd_v8\" } else { \"gap_bwd_v1\" })?;
         let (hwi, ci) = ((h * w) as i32, c as i32);
         let mut b = f.builder();
         b.arg(&dyp).arg(&hwi).arg(&ci).arg(&dxp);
         unsafe { b.launch(per_sample_cfg(h * w * c / v, n)?) }",
    ),
    (
        "src/cuda/pool.rs",
        "let v = width(n, &[ap, bp, yp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { \"add_relu_fwd_v8\" } else { \"add_relu_fwd_v1\" })?;
         let nv = (n / v) as i64;
         let mut lb = f.builder();
         lb.arg(&ap).arg(&bp).arg(&nv).arg(&yp);
         unsafe { lb.launch(grid_1d(n / v, 256)) }",
    ),
    (
        "src/cuda/pool.rs",
        "let v = width(n, &[sp, dyp, dxp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { names[0] } else { names[1] })?;
         let nv = (n / v) as i64;
         let mut b = f.builder();
         b.arg(&sp).arg(&dyp).arg(&nv).arg(&dxp);
         unsafe { b.launch(grid_1d(n / v, 256)) }",
    ),
    (
        "src/cuda/pool.rs",
        "let names = [\"relu_bwd_v8\", \"relu_bwd_v1\"];
         let g = elementwise_grad(y, dy, names, \"add+relu backward\")?;",
    ),
    (
        "src/cuda/pool.rs",
        "let v = width(per_sample, &[ap, bp, yp]);",
    ),
    (
        "src/cuda/pool.rs",
        "let per_vec = (per_sample / v) as i32;
         let mut lb = f.builder();
         lb.arg(&ap).arg(&bp).arg(&sp).arg(&per_vec).arg(&yp);
         unsafe { lb.launch(per_sample_cfg(per_sample / v, n_samples)?) }",
    ),
    (
        "src/cuda/pool.rs",
        "let v = width(per_sample, &[yp, dyp, dsp, dbp]);
         let f = kernels::func(&dev, MODULE, if v == 8 { \"relu_scaled_bwd_v8\" } else { \"relu_scaled_bwd_v1\" },)?;
         let per_vec = (per_sample / v) as i32;
         let mut lb = f.builder();
         lb.arg(&yp).arg(&dyp).arg(&sp).arg(&per_vec).arg(&dsp).arg(&dbp);
         unsafe { lb.launch(per_sample_cfg(per_sample / v, n_samples)?) }",
    ),
    (
        "src/cuda/pool.rs",
        "let v = width(c, &[xp, yp]);
         let f = kernels::func(dev, MODULE, if v == 8 { \"chan_scale_v8\" } else { \"chan_scale_v1\" })?;
         let (hwi, ci) = (hw as i32, c as i32);
         let mut b = f.builder();
         b.arg(&xp).arg(&gp).arg(&hwi).arg(&ci).arg(&yp);
         unsafe { b.launch(per_sample_cfg(hw * c / v, n)?) }",
    ),
    (
        "src/cuda/pool.rs",
        "chan_scale_launch(&dev, (xp, gp, yp), (n, h * w, c))?;",
    ),
    (
        "src/cuda/pool.rs",
        "chan_scale_launch(&dev, (dyp, gp, dxp), (n, h * w, c))?;
         let f = kernels::func(&dev, MODULE, \"chan_scale_dg\")?;
         let (ni, hwi, ci) = (n as i32, (h * w) as i32, c as i32);
         let mut b = f.builder();
         b.arg(&xp).arg(&dyp).arg(&ni).arg(&hwi).arg(&ci).arg(&dgp);
         unsafe { b.launch(grid_1d(n * c, 256)) }",
    ),
    (
        "src/cuda/pool.rs",
        "elementwise_grad(&x, dy, [\"silu_bwd_v8\", \"silu_bwd_v1\"], \"silu backward\")",
    ),
];

/// `s` without whitespace and without trailing commas (rustfmt adds those when it breaks a call
/// over lines), so the mirrors compare code, not layout.
fn squash(s: &str) -> String {
    let s: String = s.split_whitespace().collect();
    s.replace(",)", ")").replace(",}", "}").replace(",]", "]")
}

// ---------------------------------------------------------------------------------------------
// Sources, build, launch scripts.

/// `kernels.cu` (PRELUDE + the modules) and `kernels.inc` (`K(name, uses_syncthreads)`). A
/// kernel uses `__syncthreads` when its body does or calls a device function that does.
fn kernel_sources() -> (String, String) {
    let mut cu = emu::prelude();
    let mut inc = String::new();
    for file in ["src/cuda/bn.rs", "src/cuda/pool.rs"] {
        let src = emu::module_source(file);
        cu.push_str(&format!("\n// ---- {file}\n{src}"));
        // Functions: (name, is a kernel, body), a body running to the next function.
        let mut starts: Vec<(usize, bool)> = src
            .match_indices("__global__ void ")
            .map(|(i, _)| (i, true))
            .chain(src.match_indices("__device__ ").map(|(i, _)| (i, false)))
            .collect();
        starts.sort();
        let funcs: Vec<(String, bool, &str)> = starts
            .iter()
            .enumerate()
            .map(|(k, &(at, kernel))| {
                let body = &src[at..starts.get(k + 1).map_or(src.len(), |n| n.0)];
                let head = body.split('(').next().unwrap();
                let name = head.split_whitespace().last().unwrap().to_string();
                (name, kernel, body)
            })
            .collect();
        let mut syncing: Vec<&str> = funcs
            .iter()
            .filter(|f| f.2.contains("__syncthreads"))
            .map(|f| f.0.as_str())
            .collect();
        loop {
            let more: Vec<&str> = funcs
                .iter()
                .filter(|f| !syncing.contains(&f.0.as_str()))
                .filter(|f| {
                    let calls =
                        |g: &&str| f.2.contains(&format!("{g}(")) || f.2.contains(&format!("{g}<"));
                    syncing.iter().any(calls)
                })
                .map(|f| f.0.as_str())
                .collect();
            if more.is_empty() {
                break;
            }
            syncing.extend(more);
        }
        for (name, kernel, _) in &funcs {
            if *kernel {
                let syncs = syncing.contains(&name.as_str());
                inc.push_str(&format!("K({name}, {})\n", syncs as i32));
            }
        }
    }
    (cu, inc)
}

/// Builds the launcher in `dir`; `None` (with the reason) when no usable g++ is installed.
fn build_harness(dir: &Path) -> std::result::Result<PathBuf, String> {
    emu::gxx_usable(dir)?;
    let (cu, inc) = kernel_sources();
    std::fs::write(dir.join("kernels.cu"), cu).unwrap();
    std::fs::write(dir.join("kernels.inc"), inc).unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emu");
    Ok(emu::compile(
        dir,
        &here.join("harness.cpp"),
        &[&here, dir],
        "the kernels",
    ))
}

/// A launch script and its data files, in a directory of its own.
struct Script {
    dir: PathBuf,
    lines: Vec<String>,
}

impl Script {
    fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir, lines: vec![] }
    }

    fn load_bytes(&mut self, name: &str, bytes: Vec<u8>) {
        std::fs::write(self.dir.join(format!("{name}.in")), bytes).unwrap();
        self.lines.push(format!("load {name} {name}.in"));
    }

    fn load_bf16(&mut self, name: &str, v: &[u16]) {
        self.load_bytes(name, v.iter().flat_map(|b| b.to_le_bytes()).collect());
    }

    fn load_f32(&mut self, name: &str, v: &[f32]) {
        self.load_bytes(name, v.iter().flat_map(|b| b.to_le_bytes()).collect());
    }

    fn alloc(&mut self, name: &str, bytes: usize) {
        self.lines.push(format!("alloc {name} {bytes}"));
    }

    fn launch(&mut self, kernel: &str, cfg: Cfg, args: &[String]) {
        let ((gx, gy, gz), (bx, by, bz)) = cfg;
        self.lines.push(format!(
            "launch {kernel} {gx} {gy} {gz} {bx} {by} {bz} {}",
            args.join(" ")
        ));
    }

    fn save(&mut self, name: &str) {
        self.lines.push(format!("save {name} {name}.out"));
    }

    fn run(&self, exe: &Path) {
        std::fs::write(self.dir.join("script"), self.lines.join("\n") + "\n").unwrap();
        let out = Command::new(exe)
            .arg("script")
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "harness failed ({}) in {}:\n{}",
            out.status,
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn bf16(&self, name: &str) -> Vec<u16> {
        let b = std::fs::read(self.dir.join(format!("{name}.out"))).unwrap();
        b.chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        let b = std::fs::read(self.dir.join(format!("{name}.out"))).unwrap();
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn u8(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("{name}.out"))).unwrap()
    }
}

fn p(name: &str) -> String {
    format!("p:{name}")
}
fn p_off(name: &str, bytes: usize) -> String {
    format!("p:{name}+{bytes}")
}
fn i(v: usize) -> String {
    format!("i:{}", i32::try_from(v).unwrap())
}
fn l(v: usize) -> String {
    format!("l:{v}")
}
fn f(v: f32) -> String {
    format!("f:{}", v.to_bits())
}

// ---------------------------------------------------------------------------------------------
// Data and comparisons.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// f32 -> bf16 bits, round to nearest even (the PRELUDE's `f2bf` for finite values).
fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn bf16_vec(n: usize, mut gen: impl FnMut() -> f32) -> Vec<u16> {
    (0..n).map(|_| to_bf16(gen())).collect()
}

fn widen(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| from_bf16(b)).collect()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()).unwrap()
}

/// `|got - want| <= rel * |want| + abs * max|want|` everywhere; prints the observed errors.
fn close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (mut worst, mut max_diff, mut differ) = (0f32, 0f32, 0usize);
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        let bound = rel * w.abs() + abs * scale;
        assert!(
            d <= bound,
            "{what}: value {k}: {g} against {w} (difference {d:e}, bound {bound:e})"
        );
        if g.to_bits() != w.to_bits() {
            differ += 1;
        }
        max_diff = max_diff.max(d);
        worst = worst.max(d / bound.max(f32::MIN_POSITIVE));
    }
    println!(
        "  {what}: {} values, max |diff| {max_diff:.2e} ({:.2e} of max |ref| {scale:.3e}), \
         {differ} not bit-equal, worst diff / bound {worst:.3}",
        got.len(),
        max_diff / scale.max(f32::MIN_POSITIVE)
    );
}

/// [`close`] for bf16 outputs, also printing how many differ from the rounded reference (by how
/// many bf16 ulps at most): the error beyond the final rounding.
fn close_bf16(what: &str, got: &[u16], want: &[f32], rel: f32, abs: f32) {
    close(what, &widen(got), want, rel, abs);
    let (mut off, mut ulps) = (0usize, 0i32);
    for (&g, &w) in got.iter().zip(want) {
        let r = to_bf16(w);
        if g != r {
            off += 1;
            // Ordered integer view of the bf16 bits.
            let key = |b: u16| {
                if b & 0x8000 != 0 {
                    -((b & 0x7fff) as i32)
                } else {
                    b as i32
                }
            };
            ulps = ulps.max((key(g) - key(r)).abs());
        }
    }
    println!("    {off} of them differ from the reference rounded to bf16, by at most {ulps} ulp");
}

/// Bit equality of bf16 outputs with the f32 reference rounded to bf16.
fn exact(what: &str, got: &[u16], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    // A NaN matches any NaN.
    let same = |g: u16, w: f32| {
        if w.is_nan() {
            from_bf16(g).is_nan()
        } else {
            g == to_bf16(w)
        }
    };
    let bad: Vec<usize> = (0..got.len()).filter(|&k| !same(got[k], want[k])).collect();
    if let Some(&k) = bad.first() {
        panic!(
            "{what}: {} of {} values differ; first at {k}: {} against {}",
            bad.len(),
            got.len(),
            from_bf16(got[k]),
            want[k]
        );
    }
    println!("  {what}: {} values, bit-equal", got.len());
}

// ---------------------------------------------------------------------------------------------
// BatchNorm.

/// bn.rs `BatchNormTrain::cuda_fwd` then `bwd`, replayed.
fn bn_train_script(s: &mut Script, m: usize, c: usize, relu: bool, eps: f32, momentum: f32) {
    let (chunks, rows) = chunking(m, c);
    s.alloc("part", chunks * 2 * c * 4);
    let args = [p("x"), i(m), i(c), i(rows), p("part")];
    s.launch("bn_stats_partial", reduction_cfg(c, chunks), &args);
    s.alloc("stats", 4 * c * 4);
    let args = [
        p("x"),
        p("part"),
        i(chunks),
        i(m),
        i(c),
        f(eps),
        f(momentum),
        p("rm"),
        p("rv"),
        p("gamma"),
        p("beta"),
        p("stats"),
    ];
    s.launch("bn_stats_finalize", finalize_cfg(c), &args);
    apply_script(s, "stats", 8 * c, "stats", 12 * c, m, c, relu);
    for name in ["y", "rm", "rv", "stats"] {
        s.save(name);
    }
    // Backward, a fresh partial buffer. Without the ReLU the kernels must not read `y` (the
    // explicit backward does not keep it; `BatchNormTrain::backward` passes a null pointer):
    // they get an empty buffer, any read of which faults.
    s.alloc("part_b", chunks * 2 * c * 4);
    s.alloc("no_y", 0);
    let y_arg = p(if relu { "y" } else { "no_y" });
    let relu = relu as usize;
    let args = [
        p("x"),
        y_arg.clone(),
        p("dy"),
        p("stats"),
        i(m),
        i(c),
        i(rows),
        i(relu),
        p("part_b"),
    ];
    s.launch("bn_bwd_partial", reduction_cfg(c, chunks), &args);
    s.alloc("dgamma", c * 4);
    s.alloc("dbeta", c * 4);
    s.alloc("coef", 4 * c * 4);
    let args = [
        p("part_b"),
        i(chunks),
        i(m),
        i(c),
        p("stats"),
        p("gamma"),
        p("dgamma"),
        p("dbeta"),
        p("coef"),
    ];
    s.launch("bn_bwd_finalize", finalize_cfg(c), &args);
    s.alloc("dx", m * c * 2);
    let v = width(c, 8, 2);
    let args = [
        p("x"),
        y_arg,
        p("dy"),
        p("coef"),
        i(m),
        i(c),
        i(relu),
        p("dx"),
    ];
    s.launch(&kname("bn_bwd_dx", v), channel_group_cfg(m, c / v), &args);
    for name in ["dx", "dgamma", "dbeta"] {
        s.save(name);
    }
}

/// bn.rs `apply`: `bn_apply` into a new buffer `y`.
#[allow(clippy::too_many_arguments)]
fn apply_script(
    s: &mut Script,
    scale: &str,
    scale_off: usize,
    shift: &str,
    shift_off: usize,
    m: usize,
    c: usize,
    relu: bool,
) {
    s.alloc("y", m * c * 2);
    let v = width(c, 8, 2);
    let args = [
        p("x"),
        p_off(scale, scale_off),
        p_off(shift, shift_off),
        i(m),
        i(c),
        i(relu as usize),
        p("y"),
    ];
    s.launch(&kname("bn_apply", v), channel_group_cfg(m, c / v), &args);
}

struct BnParams {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn bn_params(rng: &mut Rng, c: usize) -> BnParams {
    BnParams {
        gamma: (0..c).map(|_| 1.0 + 0.3 * rng.normal()).collect(),
        beta: (0..c).map(|_| 0.2 * rng.normal()).collect(),
        rm: (0..c).map(|_| 0.5 * rng.normal()).collect(),
        rv: (0..c).map(|_| 0.5 + rng.uniform()).collect(),
    }
}

fn bn_module(pr: &BnParams, gamma: &Var, beta: &Var) -> Result<BatchNorm2d> {
    let c = pr.gamma.len();
    BatchNorm2d::new(
        gamma.as_tensor().clone(),
        beta.as_tensor().clone(),
        &Tensor::from_vec(pr.rm.clone(), c, &Device::Cpu)?,
        &Tensor::from_vec(pr.rv.clone(), c, &Device::Cpu)?,
    )
}

#[allow(clippy::too_many_arguments)]
fn bn_train_case(
    exe: &Path,
    root: &Path,
    name: &str,
    shape: [usize; 4],
    mean: f32,
    std: f32,
    relu: bool,
    seed: u64,
) -> Result<()> {
    let [n, h, w, c] = shape;
    let m = n * h * w;
    let (chunks, rows) = chunking(m, c);
    println!(
        "{name}: x [{n}, {h}, {w}, {c}] ~ N({mean}, {std}^2), relu {relu}: M {m}, {chunks} \
         chunks of {rows} rows, grid ({}, {chunks}) x block ({TX}, {TY})",
        c.div_ceil(2 * TX)
    );
    assert!(chunks > 1, "{name}: one chunk only");
    let mut rng = Rng(seed);
    let x = bf16_vec(m * c, || mean + std * rng.normal());
    let dy = bf16_vec(m * c, || rng.normal());
    let pr = bn_params(&mut rng, c);
    let (eps, momentum) = (
        trainer::model::batch_norm::BN_EPS,
        trainer::model::batch_norm::BN_MOMENTUM,
    );

    let mut s = Script::new(root, name);
    s.load_bf16("x", &x);
    s.load_bf16("dy", &dy);
    s.load_f32("gamma", &pr.gamma);
    s.load_f32("beta", &pr.beta);
    s.load_f32("rm", &pr.rm);
    s.load_f32("rv", &pr.rv);
    bn_train_script(&mut s, m, c, relu, eps as f32, momentum as f32);
    s.run(exe);

    let xv = var(&widen(&x), &shape);
    let (gamma, beta) = (var(&pr.gamma, &[c]), var(&pr.beta, &[c]));
    let bn = bn_module(&pr, &gamma, &beta)?;
    let y = nhwc::reference::batch_norm(xv.as_tensor(), &bn, true, relu)?;
    let dyt = Tensor::from_vec(widen(&dy), &shape[..], &Device::Cpu)?;
    let grads = (&y * &dyt)?.sum_all()?.backward()?;
    let grad = |v: &Var| host(grads.get(v.as_tensor()).expect("a gradient"));

    close_bf16("y", &s.bf16("y"), &host(&y), 1.0 / 128.0, 1.0 / 16384.0);
    close(
        "running mean",
        &s.f32("rm"),
        &host(bn.running_mean().as_tensor()),
        1e-5,
        0.0,
    );
    close(
        "running var",
        &s.f32("rv"),
        &host(bn.running_var().as_tensor()),
        1e-5,
        0.0,
    );
    close_bf16("dx", &s.bf16("dx"), &grad(&xv), 1.0 / 128.0, 1.0 / 4096.0);
    close("dgamma", &s.f32("dgamma"), &grad(&gamma), 0.0, 1e-5);
    close("dbeta", &s.f32("dbeta"), &grad(&beta), 0.0, 1e-5);
    Ok(())
}

fn bn_eval_case(
    exe: &Path,
    root: &Path,
    name: &str,
    shape: [usize; 4],
    relu: bool,
    seed: u64,
) -> Result<()> {
    let [n, h, w, c] = shape;
    let m = n * h * w;
    let v = width(c, 8, 2);
    let ((blocks, _, _), _) = channel_group_cfg(m, c / v);
    println!(
        "{name}: x [{n}, {h}, {w}, {c}], relu {relu}: {} groups of {v} channels x {m} rows, \
         {blocks} blocks of 256{}",
        c / v,
        if blocks * 256 < m * c / v {
            " (rows looped)"
        } else {
            ""
        }
    );
    let mut rng = Rng(seed);
    let x = bf16_vec(m * c, || 0.3 + 1.5 * rng.normal());
    let pr = bn_params(&mut rng, c);
    let (gamma, beta) = (var(&pr.gamma, &[c]), var(&pr.beta, &[c]));
    let bn = bn_module(&pr, &gamma, &beta)?;
    let (scale, shift) = bn.folded_scale_shift()?;

    let mut s = Script::new(root, name);
    s.load_bf16("x", &x);
    s.load_f32("scale", &host(&scale));
    s.load_f32("shift", &host(&shift));
    apply_script(&mut s, "scale", 0, "shift", 0, m, c, relu);
    s.save("y");
    s.run(exe);

    let xt = Tensor::from_vec(widen(&x), &shape[..], &Device::Cpu)?;
    let y = nhwc::reference::batch_norm(&xt, &bn, false, relu)?;
    exact("y", &s.bf16("y"), &host(&y));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pooling, add + ReLU.

fn maxpool_case(
    exe: &Path,
    root: &Path,
    name: &str,
    shape: [usize; 4],
    mut gen: impl FnMut(&mut Rng) -> f32,
    seed: u64,
) -> Result<()> {
    let [n, h, w, c] = shape;
    let (k, st, pad) = (3usize, 2usize, 1usize);
    let (oh, ow) = ((h + 2 * pad - k) / st + 1, (w + 2 * pad - k) / st + 1);
    println!("{name}: x [{n}, {h}, {w}, {c}], max-pool {k}/{st}/{pad} -> [{n}, {oh}, {ow}, {c}]");
    let mut rng = Rng(seed);
    let x = bf16_vec(n * h * w * c, || gen(&mut rng));
    // Multiples of 1/64 below 4 in magnitude: every sum of a few is exact.
    let dy = bf16_vec(n * oh * ow * c, || {
        ((rng.next() % 511) as f32 - 255.0) / 64.0
    });

    let mut s = Script::new(root, name);
    s.load_bf16("x", &x);
    s.load_bf16("dy", &dy);
    let len = n * oh * ow * c;
    s.alloc("y", len * 2);
    s.alloc("idx", len);
    let v = width(c, 8, 1);
    let dims = [h, w, c, oh, ow, k, st, pad].map(i);
    let mut args = vec![p("x")];
    args.extend(dims.iter().cloned());
    args.extend([p("y"), p("idx")]);
    s.launch(
        &kname("maxpool_fwd", v),
        per_sample_cfg(oh * ow * c / v, n),
        &args,
    );
    let in_len = n * h * w * c;
    s.alloc("dx", in_len * 2);
    let mut args = vec![p("dy"), p("idx")];
    args.extend(dims.iter().cloned());
    args.push(p("dx"));
    s.launch(
        &kname("maxpool_bwd", v),
        per_sample_cfg(h * w * c / v, n),
        &args,
    );
    for b in ["y", "idx", "dx"] {
        s.save(b);
    }
    s.run(exe);

    let xv = var(&widen(&x), &shape);
    let y = nhwc::reference::max_pool(xv.as_tensor(), k, st, pad)?;
    let dyt = Tensor::from_vec(widen(&dy), (n, oh, ow, c), &Device::Cpu)?;
    let grads = (&y * &dyt)?.sum_all()?.backward()?;
    exact("y", &s.bf16("y"), &host(&y));
    assert!(s.u8("idx").iter().all(|&v| (v as usize) < k * k));
    exact(
        "dx",
        &s.bf16("dx"),
        &host(grads.get(xv.as_tensor()).unwrap()),
    );
    Ok(())
}

fn gap_case(exe: &Path, root: &Path, shape: [usize; 4], seed: u64) -> Result<()> {
    let [n, h, w, c] = shape;
    println!(
        "global average pool: x [{n}, {h}, {w}, {c}], {} channel(s) per thread",
        width(c, 8, 1)
    );
    let mut rng = Rng(seed);
    let x = bf16_vec(n * h * w * c, || 0.5 + rng.normal());
    let dy: Vec<f32> = (0..n * c).map(|_| rng.normal()).collect();
    let mut s = Script::new(root, &format!("gap {n}x{h}x{w}x{c}"));
    s.load_bf16("x", &x);
    s.load_f32("dy", &dy);
    s.alloc("y", n * c * 4);
    let args = [p("x"), i(n), i(h * w), i(c), p("y")];
    s.launch("gap_fwd", grid_1d(n * c, 256), &args);
    let len = n * h * w * c;
    s.alloc("dx", len * 2);
    let v = width(c, 8, 1);
    let args = [p("dy"), i(h * w), i(c), p("dx")];
    s.launch(
        &kname("gap_bwd", v),
        per_sample_cfg(h * w * c / v, n),
        &args,
    );
    s.save("y");
    s.save("dx");
    s.run(exe);

    let xw = widen(&x);
    let xv = var(&xw, &shape);
    let y = nhwc::reference::global_avg_pool(xv.as_tensor())?;
    let dyt = Tensor::from_vec(dy, (n, c), &Device::Cpu)?;
    let grads = (&y * &dyt)?.sum_all()?.backward()?;
    let max_x = xw.iter().fold(0f32, |a, v| a.max(v.abs()));
    let yref = host(&y);
    let max_y = yref.iter().fold(0f32, |a, v| a.max(v.abs()));
    let abs = (h * w) as f32 * f32::EPSILON * max_x / max_y;
    close("y", &s.f32("y"), &yref, 0.0, abs);
    let dx = host(grads.get(xv.as_tensor()).unwrap());
    close_bf16("dx", &s.bf16("dx"), &dx, 1.0 / 128.0, 0.0);
    Ok(())
}

fn add_relu_case(exe: &Path, root: &Path, shape: [usize; 4], seed: u64) -> Result<()> {
    let len: usize = shape.iter().product();
    println!(
        "add + relu: {shape:?}, {len} values, {} per thread",
        width(len, 8, 1)
    );
    let mut rng = Rng(seed);
    let a = bf16_vec(len, || rng.normal());
    let mut b = bf16_vec(len, || rng.normal());
    for (av, bv) in a.iter().zip(b.iter_mut()) {
        // No exact zero pre-activation (see the module doc).
        while from_bf16(*av) + from_bf16(*bv) == 0.0 {
            *bv = to_bf16(rng.normal());
        }
    }
    let dy = bf16_vec(len, || rng.normal());
    let mut s = Script::new(root, &format!("add_relu {len}"));
    s.load_bf16("a", &a);
    s.load_bf16("b", &b);
    s.load_bf16("dy", &dy);
    s.alloc("y", len * 2);
    let v = width(len, 8, 1);
    s.launch(
        &kname("add_relu_fwd", v),
        grid_1d(len / v, 256),
        &[p("a"), p("b"), l(len / v), p("y")],
    );
    s.alloc("dx", len * 2);
    s.launch(
        &kname("relu_bwd", v),
        grid_1d(len / v, 256),
        &[p("y"), p("dy"), l(len / v), p("dx")],
    );
    s.save("y");
    s.save("dx");
    s.run(exe);

    let (av, bv) = (var(&widen(&a), &shape), var(&widen(&b), &shape));
    let y = nhwc::reference::add_relu(av.as_tensor(), bv.as_tensor())?;
    let dyt = Tensor::from_vec(widen(&dy), &shape[..], &Device::Cpu)?;
    let grads = (&y * &dyt)?.sum_all()?.backward()?;
    exact("y", &s.bf16("y"), &host(&y));
    let dx = s.bf16("dx");
    exact("da", &dx, &host(grads.get(av.as_tensor()).unwrap()));
    exact("db", &dx, &host(grads.get(bv.as_tensor()).unwrap()));
    Ok(())
}

/// Channel attention's gate `x * g[n, c]` and its backward: the product and `dx` bit for bit the
/// bf16 rounding of the exact f32 product (candle's bf16 multiply), `dg` (f32 sums over the
/// sample's pixels in pixel order) within `HW * 2^-23 * max|x * dy|` of the f64 sums.
fn chan_scale_case(exe: &Path, root: &Path, shape: [usize; 4], seed: u64) -> Result<()> {
    let [n, h, w, c] = shape;
    let (hw, len) = (h * w, n * h * w * c);
    let v = width(c, 8, 1);
    println!("channel scale: x [{n}, {h}, {w}, {c}], {v} channel(s) per thread");
    let mut rng = Rng(seed);
    let x = bf16_vec(len, || rng.normal());
    let g = bf16_vec(n * c, || 0.5 + 0.3 * rng.normal());
    let dy = bf16_vec(len, || rng.normal());
    let mut s = Script::new(root, &format!("chan_scale {n}x{h}x{w}x{c}"));
    s.load_bf16("x", &x);
    s.load_bf16("g", &g);
    s.load_bf16("dy", &dy);
    s.alloc("y", len * 2);
    let cfg = per_sample_cfg(hw * c / v, n);
    s.launch(
        &kname("chan_scale", v),
        cfg,
        &[p("x"), p("g"), i(hw), i(c), p("y")],
    );
    s.alloc("dx", len * 2);
    s.launch(
        &kname("chan_scale", v),
        cfg,
        &[p("dy"), p("g"), i(hw), i(c), p("dx")],
    );
    s.alloc("dg", n * c * 4);
    let args = [p("x"), p("dy"), i(n), i(hw), i(c), p("dg")];
    s.launch("chan_scale_dg", grid_1d(n * c, 256), &args);
    s.save("y");
    s.save("dx");
    s.save("dg");
    s.run(exe);

    let (xw, gw, dyw) = (widen(&x), widen(&g), widen(&dy));
    let gate = |k: usize| gw[(k / (hw * c)) * c + k % c];
    let y: Vec<f32> = (0..len).map(|k| xw[k] * gate(k)).collect();
    exact("y", &s.bf16("y"), &y);
    let dx: Vec<f32> = (0..len).map(|k| dyw[k] * gate(k)).collect();
    exact("dx", &s.bf16("dx"), &dx);
    let mut dg = vec![0f64; n * c];
    let mut max_term = 0f32;
    for k in 0..len {
        let t = xw[k] * dyw[k];
        max_term = max_term.max(t.abs());
        dg[(k / (hw * c)) * c + k % c] += t as f64;
    }
    let dg: Vec<f32> = dg.iter().map(|&v| v as f32).collect();
    let max_dg = dg.iter().fold(0f32, |a, v| a.max(v.abs()));
    let abs = hw as f32 * f32::EPSILON * max_term / max_dg;
    close("dg", &s.f32("dg"), &dg, 0.0, abs);
    Ok(())
}

/// SiLU's gradient from its input against candle's SiLU backward on the same values in f32:
/// within one bf16 rounding (`2^-7` relative) plus `2^-12` of the largest gradient (the f32
/// `1 - s` for large |x| and `expf` against candle's formula).
fn silu_bwd_case(exe: &Path, root: &Path, len: usize, seed: u64) -> Result<()> {
    let v = width(len, 8, 1);
    println!("silu backward: {len} values, {v} per thread");
    let mut rng = Rng(seed);
    let x = bf16_vec(len, || 3.0 * rng.normal());
    let dy = bf16_vec(len, || rng.normal());
    let mut s = Script::new(root, &format!("silu_bwd {len}"));
    s.load_bf16("x", &x);
    s.load_bf16("dy", &dy);
    s.alloc("dx", len * 2);
    s.launch(
        &kname("silu_bwd", v),
        grid_1d(len / v, 256),
        &[p("x"), p("dy"), l(len / v), p("dx")],
    );
    s.save("dx");
    s.run(exe);

    let xv = var(&widen(&x), &[len]);
    let y = xv.as_tensor().silu()?;
    let dyt = Tensor::from_vec(widen(&dy), len, &Device::Cpu)?;
    let grads = (&y * &dyt)?.sum_all()?.backward()?;
    let dx = host(grads.get(xv.as_tensor()).unwrap());
    close_bf16("dx", &s.bf16("dx"), &dx, 1.0 / 128.0, 1.0 / 4096.0);
    Ok(())
}

/// Stochastic depth folded into the add: `relu(bf16(a * scale[n]) + b)` and its backward, bit
/// for bit the unfused bf16 multiply followed by `add_relu_fwd` / `relu_bwd` and a multiply.
fn add_relu_scaled_case(exe: &Path, root: &Path, shape: [usize; 4], seed: u64) -> Result<()> {
    let len: usize = shape.iter().product();
    let per = len / shape[0];
    println!(
        "add + relu with per-sample scales: {shape:?}, {len} values, {} per thread",
        width(per, 8, 1)
    );
    let mut rng = Rng(seed);
    let scales: Vec<u16> = trainer::model::drop_path::drop_path_scales(shape[0], 0.3, seed, 2)
        .iter()
        .map(|&v| to_bf16(v as f32))
        .collect();
    assert!(
        scales.contains(&0) && scales.iter().any(|&v| v != 0),
        "both kept and dropped"
    );
    let a = bf16_vec(len, || rng.normal());
    let b = bf16_vec(len, || rng.normal());
    let dy = bf16_vec(len, || rng.normal());
    let mut s = Script::new(root, &format!("add_relu_scaled {len}"));
    s.load_bf16("a", &a);
    s.load_bf16("b", &b);
    s.load_bf16("s", &scales);
    s.load_bf16("dy", &dy);
    s.alloc("y", len * 2);
    let v = width(per, 8, 1);
    let cfg = per_sample_cfg(per / v, shape[0]);
    let args = [p("a"), p("b"), p("s"), i(per / v), p("y")];
    s.launch(&kname("add_relu_scaled_fwd", v), cfg, &args);
    s.alloc("ds", len * 2);
    s.alloc("db", len * 2);
    let args = [p("y"), p("dy"), p("s"), i(per / v), p("ds"), p("db")];
    s.launch(&kname("relu_scaled_bwd", v), cfg, &args);
    s.save("y");
    s.save("ds");
    s.save("db");
    s.run(exe);

    let scale = |i: usize| from_bf16(scales[i / per]);
    let y: Vec<f32> = (0..len)
        .map(|i| {
            let prod = from_bf16(to_bf16(from_bf16(a[i]) * scale(i)));
            (prod + from_bf16(b[i])).max(0.0)
        })
        .collect();
    exact("y", &s.bf16("y"), &y);
    let yk = s.bf16("y");
    let g: Vec<f32> = (0..len)
        .map(|i| {
            if from_bf16(yk[i]) > 0.0 {
                from_bf16(dy[i])
            } else {
                0.0
            }
        })
        .collect();
    exact("d_shortcut", &s.bf16("ds"), &g);
    let gb: Vec<f32> = (0..len).map(|i| g[i] * scale(i)).collect();
    exact("d_branch", &s.bf16("db"), &gb);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn launch_code_matches_the_mirror() {
    for (file, text) in MIRRORED {
        assert!(
            squash(&emu::source_file(file)).contains(&squash(text)),
            "{file} no longer contains this launch code, replayed by tests/kernel_emu.rs \
             (update the replay):\n{text}"
        );
    }
}

#[test]
fn emulated_cuda_kernels_match_cpu_references() -> Result<()> {
    let start = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let exe = match build_harness(root) {
        Ok(exe) => exe,
        Err(why) => {
            println!("skipped: {why}");
            return Ok(());
        }
    };
    println!("harness built in {:.1} s", start.elapsed().as_secs_f32());
    let t = std::time::Instant::now();

    // C = 96: two column blocks, the second half empty (the `c < C` guard).
    bn_train_case(
        exe.as_path(),
        root,
        "bn train + relu",
        [7, 11, 13, 96],
        0.0,
        1.0,
        true,
        1,
    )?;
    // M = 4725: 10 rows per chunk (more than TY), a short last chunk.
    bn_train_case(&exe, root, "bn train", [3, 35, 45, 96], 0.3, 2.0, false, 2)?;
    bn_train_case(
        &exe,
        root,
        "bn train, mean 50",
        [4, 10, 10, 96],
        50.0,
        1.0,
        false,
        3,
    )?;
    bn_train_case(
        &exe,
        root,
        "bn train + relu, C 6",
        [2, 9, 7, 6],
        -0.5,
        1.0,
        true,
        4,
    )?;
    bn_eval_case(&exe, root, "bn eval + relu", [2, 5, 7, 96], true, 5)?;
    bn_eval_case(&exe, root, "bn eval, large", [4, 64, 64, 72], false, 6)?;
    // C 10: 2 channels per thread (the 8-wide path needs C % 8 == 0).
    bn_eval_case(&exe, root, "bn eval + relu, C 10", [3, 7, 5, 10], true, 13)?;
    let normal = |mean: f32| move |r: &mut Rng| mean + r.normal();
    maxpool_case(&exe, root, "max-pool odd", [2, 13, 11, 6], normal(-2.0), 7)?;
    maxpool_case(&exe, root, "max-pool even", [2, 12, 10, 5], normal(0.0), 8)?;
    // Values in {-1, 0, 1, 2}: ties in most windows.
    let ties = |r: &mut Rng| (r.next() % 4) as f32 - 1.0;
    maxpool_case(&exe, root, "max-pool ties", [2, 9, 8, 7], ties, 9)?;
    // About 4 % NaN: a NaN wins its window (PyTorch, and the CPU op).
    let nans = |r: &mut Rng| {
        if r.next().is_multiple_of(25) {
            f32::NAN
        } else {
            r.normal()
        }
    };
    maxpool_case(&exe, root, "max-pool NaN", [2, 11, 10, 4], nans, 12)?;
    // C 16: 8 channels per thread, the stem's path (C 64).
    maxpool_case(
        &exe,
        root,
        "max-pool 8-wide",
        [2, 13, 12, 16],
        normal(0.5),
        14,
    )?;
    maxpool_case(&exe, root, "max-pool 8-wide ties", [3, 8, 9, 8], ties, 15)?;
    // Both widths of the others: C or the element count a multiple of 8 or not.
    gap_case(&exe, root, [3, 7, 5, 40], 10)?;
    gap_case(&exe, root, [2, 3, 5, 6], 16)?;
    add_relu_case(&exe, root, [2, 9, 9, 30], 11)?;
    add_relu_case(&exe, root, [2, 5, 6, 32], 17)?;
    add_relu_scaled_case(&exe, root, [6, 5, 7, 12], 12)?;
    add_relu_scaled_case(&exe, root, [5, 3, 3, 16], 18)?;
    chan_scale_case(&exe, root, [3, 7, 5, 40], 19)?;
    chan_scale_case(&exe, root, [2, 5, 3, 12], 20)?;
    silu_bwd_case(&exe, root, 4000, 21)?;
    silu_bwd_case(&exe, root, 1001, 22)?;
    println!(
        "emulated launches and references: {:.1} s",
        t.elapsed().as_secs_f32()
    );
    Ok(())
}
