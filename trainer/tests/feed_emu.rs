//! The feed kernels of `trainer/src/cuda/feed.rs` run on the CPU and are compared, bit for bit,
//! with the CPU definitions: `mix_u8` with `loader::mix::mix_u8_batch`, `feed_nchw_f32` with
//! `Feed::images`, `feed_nhwc_bf16` with `Feed::images_for(.., Nhwc)` rounded to bf16. Needs no
//! GPU and no CUDA toolkit, only `g++`: the kernel source (and the kernels' `PRELUDE`) is read
//! out of the `.rs` files, compiled as C++ with `kernel_emu/shim.h` (the CUDA built-ins; these
//! kernels have no barriers, so threads simply run one after another) and `feed_emu/harness.cpp`,
//! and run once per case. The `__f*_rn` intrinsics are plain f32 operations here, compiled with
//! `-ffp-contract=off`, which is what they are on the GPU. Without `g++` the test prints
//! `skipped: ...` and passes.

mod emu;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Result};
use loader::mix::{mix_u8_batch, MixDraw, MixKind};
use trainer::feed::{Feed, Normalization};
use trainer::model::ActivationLayout;

const RN: &str = r#"
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
"#;

fn build_harness(dir: &Path) -> std::result::Result<PathBuf, String> {
    emu::gxx_usable(dir)?;
    let prelude = emu::prelude();
    let kernels = emu::module_source("src/cuda/feed.rs");
    std::fs::write(dir.join("rn.h"), RN).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("kernels.cu"), format!("{prelude}\n{kernels}"))
        .map_err(|e| e.to_string())?;
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let exe = dir.join("feed_emu");
    let out = Command::new("g++")
        .args([
            "-std=c++17",
            "-O1",
            "-ffp-contract=off",
            "-x",
            "c++",
            "-include",
        ])
        .arg(tests.join("kernel_emu/shim.h"))
        .arg("-include")
        .arg(dir.join("rn.h"))
        .arg("-include")
        .arg(dir.join("kernels.cu"))
        .arg(tests.join("feed_emu/harness.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .map_err(|e| format!("g++ not runnable: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("c++17") || err.contains("ucontext") {
            return Err(format!("g++ cannot build the shim: {err}"));
        }
        panic!("the feed kernels do not compile as C++:\n{err}");
    }
    Ok(exe)
}

/// Runs `kernel` over `images` and returns the output bytes.
#[allow(clippy::too_many_arguments)]
fn run(
    exe: &Path,
    dir: &Path,
    kernel: &str,
    images: &[u8],
    n: usize,
    size: usize,
    draw: &MixDraw,
    grid: (usize, usize),
) -> Vec<u8> {
    let (mode, b) = match draw.kind {
        MixKind::None => (0, [0; 4]),
        MixKind::Mixup => (1, [0; 4]),
        MixKind::CutMix(bx) => (2, [bx.y0, bx.y1, bx.x0, bx.x1]),
    };
    // The weights as the Rust launch code computes them (`mix_args`), printed exactly.
    let (l, r) = (draw.lam as f32, (1.0 - draw.lam) as f32);
    let (mean, std) = Normalization::IMAGENET.scaled();
    let (input, output) = (dir.join("in.bin"), dir.join("out.bin"));
    std::fs::write(&input, images).unwrap();
    let mut args: Vec<String> = vec![
        kernel.into(),
        input.display().to_string(),
        output.display().to_string(),
        n.to_string(),
        size.to_string(),
        mode.to_string(),
        format!("{l:e}"),
        format!("{r:e}"),
    ];
    args.extend(b.iter().map(|v| v.to_string()));
    args.extend(mean.iter().chain(&std).map(|v| format!("{v:e}")));
    args.push(grid.0.to_string());
    args.push(grid.1.to_string());
    let st = Command::new(exe)
        .args(&args)
        .status()
        .expect("harness runs");
    assert!(st.success(), "harness {kernel} failed: {st}");
    std::fs::read(&output).unwrap()
}

/// Equal, or a panic naming the first differing element (not a dump of both).
fn same<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("{what}: element {i}: got {:?}, want {:?}", got[i], want[i]);
    }
}

#[test]
fn emulated_feed_kernels_match_the_cpu_definitions() -> Result<()> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let exe = match build_harness(dir) {
        Ok(exe) => exe,
        Err(why) => {
            println!("skipped: {why}");
            return Ok(());
        }
    };
    let (n, size) = (6usize, 13usize);
    let mut rng = loader::rng::Rng::new(11);
    let images: Vec<u8> = (0..n * size * size * 3)
        .map(|_| rng.below(256) as u8)
        .collect();
    let feed = Feed::new(&Device::Cpu)?;
    let total = n * size * size * 3;
    // The launch geometry of feed.rs (256 threads, at most 8192 blocks), and a small grid that
    // makes every thread loop.
    let grids = [(total.div_ceil(256).min(8192), 256), (3, 64)];
    for d in emu::mix_draws(size, 6) {
        let mut mixed = images.clone();
        mix_u8_batch(&mut mixed, n, size, size, 3, &d);
        for grid in grids {
            let got = run(&exe, dir, "mix_u8", &images, n, size, &d, grid);
            same(&format!("mix_u8 {d:?} {grid:?}"), &got, &mixed);

            let want = feed
                .images(&mixed, n, size)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let got = run(&exe, dir, "feed_nchw_f32", &images, n, size, &d, grid);
            let got: Vec<u32> = got
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
            same(&format!("feed_nchw_f32 {d:?} {grid:?}"), &got, &want);

            // bf16 values widened to f32 exactly, on both sides.
            let want = feed
                .images_for(&mixed, n, size, ActivationLayout::Nhwc)?
                .to_dtype(DType::BF16)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let got = run(&exe, dir, "feed_nhwc_bf16", &images, n, size, &d, grid);
            let got: Vec<u32> = got
                .chunks_exact(2)
                .map(|c| (u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
                .collect();
            let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
            same(&format!("feed_nhwc_bf16 {d:?} {grid:?}"), &got, &want);
        }
    }
    Ok(())
}

#[test]
fn launch_geometry_matches_the_mirror() {
    let text = emu::source_file("src/cuda/feed.rs");
    for line in [
        "const THREADS: u32 = 256;",
        "const MAX_BLOCKS: usize = 8192;",
    ] {
        assert!(
            text.contains(line),
            "feed.rs no longer has `{line}` (update tests/feed_emu.rs)"
        );
    }
}
