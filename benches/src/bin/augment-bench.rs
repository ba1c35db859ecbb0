//! `augment-bench`: time per call of each RandAugment op and of Mixup/CutMix, at a given image
//! size, on a generated photo-like image. One JSON line per op (milliseconds per image), plus
//! the expected RandAugment cost per image under a config (each op's time weighted by how
//! often the config draws it). The loader-level figure is `loader-bench --rand-augment`.

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use loader::mix::{self, CutBox, MixDraw, MixKind};
use loader::rand_augment::{Op, OpDraw, RandAugment, RandAugmentConfig, IMAGENET_FILL};
use loader::rng::Rng;
use loader::transform::Interpolation;
use serde_json::json;
use tools::bench::{cpu_model, exit_on_error, git_rev, median, print_json_line};

#[derive(Parser, Debug)]
#[command(name = "augment-bench")]
struct Args {
    /// Image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// RandAugment config for the expected per-image cost.
    #[arg(long, default_value = "rand-m7-mstd0.5-inc1")]
    rand_augment: String,
    /// Calls per measurement.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Repeats; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Measure only this op (e.g. under `perf stat`).
    #[arg(long)]
    only: Option<String>,
    /// Batch size for Mixup/CutMix.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

fn photo_like(size: usize) -> Vec<u8> {
    let mut rng = Rng::new(1);
    let mut img = vec![0u8; size * size * 3];
    for y in 0..size {
        for x in 0..size {
            let p = (y * size + x) * 3;
            let n = (rng.below(24) as i32) - 12;
            let v = [
                (x * 255 / size) as i32 + n,
                (y * 255 / size) as i32 + n,
                (((x / 16 + y / 16) % 2) * 160 + 40) as i32 + n,
            ];
            for c in 0..3 {
                img[p + c] = v[c].clamp(0, 255) as u8;
            }
        }
    }
    img
}

fn main() -> std::process::ExitCode {
    exit_on_error("augment-bench", run(Args::parse()))
}

fn run(a: Args) -> Result<()> {
    let base = json!({ "git_rev": git_rev(), "cpu_model": cpu_model(), "size": a.size });
    let emit = |extra: serde_json::Value| print_json_line(&base, extra);
    let src = photo_like(a.size);
    let mut img = src.clone();
    let cfg = RandAugmentConfig::parse(&a.rand_augment).map_err(anyhow::Error::msg)?;
    let mut per_op = std::collections::HashMap::new();
    let only: Option<Op> = a
        .only
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    for op in Op::ALL {
        if only.is_some_and(|o| o != op) {
            continue;
        }
        for interpolation in [Interpolation::Bilinear, Interpolation::Bicubic] {
            if !op.is_geometric() && interpolation == Interpolation::Bicubic {
                continue;
            }
            let draw = OpDraw {
                op,
                magnitude: cfg.magnitude,
                negate: false,
                interpolation,
            };
            let runs: Vec<f64> = (0..a.repeats)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..a.calls {
                        img.copy_from_slice(&src);
                        RandAugment::apply_op(&draw, IMAGENET_FILL, &mut img, a.size, a.size);
                    }
                    t.elapsed().as_secs_f64()
                })
                .collect();
            // Subtract the copy that restores the input.
            let t = Instant::now();
            for _ in 0..a.calls {
                img.copy_from_slice(&src);
                std::hint::black_box(&mut img);
            }
            let copy = t.elapsed().as_secs_f64();
            let ms = ((median(runs) - copy) / a.calls as f64 * 1e3).max(0.0);
            per_op.entry(op).or_insert_with(Vec::new).push(ms);
            emit(
                json!({ "op": op.name(), "interpolation": format!("{interpolation:?}").to_lowercase(),
                "ms_per_image": ms }),
            );
        }
    }
    if only.is_some() {
        return Ok(());
    }
    // Expected cost per image: num_layers draws, each applied with `prob`; geometric ops use
    // the mean of the two filters (the random choice).
    let list = cfg.ops();
    let mean_op = list
        .iter()
        .map(|op| {
            let t = &per_op[op];
            t.iter().sum::<f64>() / t.len() as f64
        })
        .sum::<f64>()
        / list.len() as f64;
    emit(json!({ "rand_augment": a.rand_augment,
        "expected_ms_per_image": mean_op * cfg.prob * cfg.num_layers as f64 }));

    // Mixup / CutMix on a u8 batch.
    let b = a.batch_size;
    let mut batch: Vec<u8> = (0..b).flat_map(|_| src.iter().copied()).collect();
    for (name, draw) in [
        (
            "mixup",
            MixDraw {
                lam: 0.3,
                kind: MixKind::Mixup,
            },
        ),
        (
            "cutmix",
            MixDraw {
                lam: 0.5,
                kind: MixKind::CutMix(CutBox {
                    y0: a.size / 4,
                    y1: a.size * 3 / 4,
                    x0: a.size / 4,
                    x1: a.size * 3 / 4,
                }),
            },
        ),
    ] {
        let runs: Vec<f64> = (0..a.repeats)
            .map(|_| {
                let t = Instant::now();
                mix::mix_u8_batch(&mut batch, b, a.size, a.size, 3, &draw);
                t.elapsed().as_secs_f64()
            })
            .collect();
        emit(json!({ "op": name, "batch_size": b, "ms_per_image": median(runs) * 1e3 / b as f64 }));
    }
    Ok(())
}
