//! Shared by the kernel emulation tests (`kernel_emu`, `lamb_emu`, `feed_emu`): reading the
//! CUDA C sources out of the Rust files and building a C++ harness around them with g++; and
//! the Mixup/CutMix draws both feed-kernel tests (`feed_emu`, `cuda_feed`) run.

#![allow(dead_code)] // each test uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;

use loader::mix::{CutBox, MixConfig, MixDraw, MixKind};

/// A file of the trainer crate, as text.
pub fn source_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text between `start` and the next `end` in `text`.
pub fn between<'a>(text: &'a str, start: &str, end: &str, what: &str) -> &'a str {
    let rest = text
        .split_once(start)
        .unwrap_or_else(|| panic!("{what}: no `{start}`"))
        .1;
    rest.split_once(end)
        .unwrap_or_else(|| panic!("{what}: no `{end}`"))
        .0
}

/// `kernels::PRELUDE` (bf16 helpers every module is compiled with).
pub fn prelude() -> String {
    let text = source_file("src/cuda/kernels.rs");
    between(&text, "pub const PRELUDE: &str = r#\"", "\"#;", "PRELUDE").to_string()
}

/// The CUDA C source of the `MODULE` in `file` (e.g. `src/cuda/bn.rs`).
pub fn module_source(file: &str) -> String {
    let text = source_file(file);
    between(&text, "source: r#\"", "\"#,", file).to_string()
}

/// `Err` with the reason when no g++ that builds the fiber shim (C++17, ucontext) is installed:
/// the tests then print `skipped: ...` and pass.
pub fn gxx_usable(dir: &Path) -> Result<(), String> {
    let probe = dir.join("probe.cpp");
    std::fs::write(
        &probe,
        "#include <ucontext.h>\n#include <tuple>\n#include <type_traits>\n\
         inline int v = 0;\nint main() { if constexpr (std::is_pointer_v<int*>) \
         { ucontext_t c; getcontext(&c); } return std::get<0>(std::tuple<int>{v}); }\n",
    )
    .unwrap();
    match Command::new("g++")
        .args(["-std=c++17", "-o"])
        .arg(dir.join("probe"))
        .arg(&probe)
        .output()
    {
        Err(e) => Err(format!("g++ not runnable ({e})")),
        Ok(o) if !o.status.success() => Err(format!(
            "g++ cannot build C++17 with ucontext: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Ok(_) => Ok(()),
    }
}

/// Compiles `harness` (with `includes` on the include path) to `dir/harness`, without fused
/// multiply-adds, so the emulation does exactly the operations the kernel source writes; a
/// compile error fails the test.
pub fn compile(dir: &Path, harness: &Path, includes: &[&Path], what: &str) -> PathBuf {
    let exe = dir.join("harness");
    let mut cmd = Command::new("g++");
    cmd.args([
        "-std=c++17",
        "-O1",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-Wall",
        // `#pragma unroll` is CUDA's; g++ would warn about every one.
        "-Wno-unknown-pragmas",
    ]);
    for inc in includes {
        cmd.arg(format!("-I{}", inc.display()));
    }
    let out = cmd
        .arg(harness)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("g++ ran a moment ago");
    assert!(
        out.status.success(),
        "compiling {what} as C++ failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Mixup/CutMix draws for the feed kernels: no mix, two Mixup lambdas, a CutMix box touching
/// the right edge, then `recipe_draws` real draws of the A2 recipe's settings.
pub fn mix_draws(size: usize, recipe_draws: u64) -> Vec<MixDraw> {
    let mut v = vec![
        MixDraw {
            lam: 1.0,
            kind: MixKind::None,
        },
        MixDraw {
            lam: 0.5,
            kind: MixKind::Mixup,
        },
        MixDraw {
            lam: 0.123_456_789,
            kind: MixKind::Mixup,
        },
        MixDraw {
            lam: 0.5,
            kind: MixKind::CutMix(CutBox {
                y0: 1,
                y1: size - 2,
                x0: 3,
                x1: size,
            }),
        },
    ];
    let cfg = MixConfig {
        mixup_alpha: 0.1,
        cutmix_alpha: 1.0,
        mix_prob: 1.0,
        switch_prob: 0.5,
        label_smoothing: 0.0,
    };
    v.extend((0..recipe_draws).map(|step| cfg.draw(5, 1, step, size, size)));
    v
}
