//! Inputs shared by the micro-benchmarks: ImageNet-sized JPEGs (about 500x375, quality 90,
//! 4:2:0), generated so the benchmarks need no data set.

use loader::rng::Rng;

/// `n` generated JPEGs of ImageNet-like size.
pub fn jpegs(n: usize) -> Vec<Vec<u8>> {
    let dir = tempfile_dir();
    let opts = tools::synth::SynthOptions {
        classes: n.min(8),
        per_class: n.div_ceil(n.min(8)),
        val_per_class: 1,
        seed: 3,
        oddities: false,
        val_layout: tools::synth::ValLayout::Folders,
        quality: 90,
        threads: 2,
    };
    tools::synth::generate(&dir, &opts).expect("generating JPEGs");
    let mut out: Vec<Vec<u8>> = tools::files_under(&dir.join("train"))
        .expect("listing the generated files")
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    out.sort();
    out.truncate(n);
    out
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "rsb-bench-{}",
        Rng::new(std::process::id() as u64).next_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
