//! RandAugment's ops and Mixup/CutMix against timm v0.5.4 + Pillow golden values
//! (`golden/rand_augment.py`; its docstring says how they were made).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use loader::mix::{self, CutBox, MixDraw, MixKind};
use loader::rand_augment::ops::affine_exact;
use loader::rand_augment::{op_matrix, Op, OpArg, OpDraw, RandAugment, IMAGENET_FILL};
use loader::transform::Interpolation;
use serde_json::Value;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/augment")
        .join(name)
}

fn json() -> Value {
    serde_json::from_slice(&std::fs::read(golden("golden.json")).unwrap()).unwrap()
}

fn png(path: &Path) -> (Vec<u8>, usize, usize) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    (img.into_raw(), w, h)
}

/// Mean and maximum absolute difference, and the 99th percentile.
fn diff(a: &[u8], b: &[u8]) -> (f64, u8, u8) {
    let mut d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    let mean = d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
    d.sort_unstable();
    let p99 = d[(d.len() - 1) * 99 / 100];
    (mean, *d.last().unwrap(), p99)
}

/// How closely an op must match Pillow.
fn tolerance(op: Op) -> Option<(f64, u8)> {
    // Point ops are table lookups on integers: exact.
    // Enhancements (blends) follow Pillow's arithmetic step by step and match exactly here,
    // but are allowed the geometric tolerance: a float expression compiled differently (for
    // example with fused multiply-add in another Pillow build) can move a value that lands
    // on an integer by one level.
    // Geometric ops in training use `ops::affine`: Pillow's sample positions with the filter
    // as single-precision weights, so a value within rounding error of an integer can
    // truncate one level differently (measured: max 1 level, worst mean 0.16 level on these
    // small, edge-heavy images). Allowed: mean < 0.5 level, p99 <= 2 levels; a level is
    // invisible to training, and a wrong filter, centre or fill would be tens of levels off.
    // `ops::affine_exact` (Pillow's arithmetic) must match exactly; checked below.
    match op {
        Op::AutoContrast
        | Op::Equalize
        | Op::Invert
        | Op::Posterize
        | Op::PosterizeIncreasing
        | Op::Solarize
        | Op::SolarizeIncreasing
        | Op::SolarizeAdd => None,
        _ => Some((0.5, 2)),
    }
}

#[test]
fn ops_match_timm_and_pillow() {
    let g = json();
    let fill: Vec<u8> = g["fill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(fill, IMAGENET_FILL);
    let mut report: BTreeMap<String, (usize, usize, f64, u8)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (iname, spec) in g["images"].as_object().unwrap() {
        let (input, w, h) = png(&golden(&format!("{iname}.png")));
        assert_eq!(
            (w as u64, h as u64),
            (
                spec["width"].as_u64().unwrap(),
                spec["height"].as_u64().unwrap()
            )
        );
        for (oname, variants) in spec["ops"].as_object().unwrap() {
            let op: Op = oname.parse().unwrap();
            let (want_all, ww, wh) = png(&golden(&format!("{iname}_{oname}.png")));
            let variants = variants.as_array().unwrap();
            assert_eq!((ww, wh), (w, h * variants.len()));
            for (k, v) in variants.iter().enumerate() {
                let magnitude = v["magnitude"].as_f64().unwrap();
                let negate = v["negate"].as_bool().unwrap();
                let interpolation = match v["filter"].as_str() {
                    Some("bicubic") => Interpolation::Bicubic,
                    _ => Interpolation::Bilinear,
                };
                // timm's level-to-argument mapping.
                let timm_arg: Vec<f64> = v["arg"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_f64().unwrap())
                    .collect();
                let ours = match op.arg(magnitude, negate) {
                    OpArg::None => vec![],
                    OpArg::Degrees(x) | OpArg::Factor(x) | OpArg::Shear(x) | OpArg::Fraction(x) => {
                        vec![x]
                    }
                    OpArg::Bits(x) | OpArg::Threshold(x) | OpArg::Add(x) => vec![x as f64],
                };
                assert_eq!(
                    ours, timm_arg,
                    "{oname} m={magnitude} negate={negate}: argument"
                );

                let mut got = input.clone();
                let draw = OpDraw {
                    op,
                    magnitude,
                    negate,
                    interpolation,
                };
                RandAugment::apply_op(&draw, IMAGENET_FILL, &mut got, w, h);
                let want = &want_all[k * w * h * 3..(k + 1) * w * h * 3];
                // The Pillow-exact transform (training uses the faster `affine`).
                if let Some(m) = op_matrix(op, op.arg(magnitude, negate), w, h) {
                    let mut exact = vec![0; input.len()];
                    affine_exact(&input, &mut exact, w, h, m, interpolation, IMAGENET_FILL);
                    if exact != want {
                        failures.push(format!(
                            "{iname} {oname} m={magnitude} negate={negate} {interpolation:?}: affine_exact differs from Pillow"
                        ));
                    }
                }
                let (mean, max, p99) = diff(&got, want);
                let e = report.entry(oname.clone()).or_default();
                e.0 += 1;
                e.1 += (max == 0) as usize;
                e.2 = e.2.max(mean);
                e.3 = e.3.max(max);
                let ok = match tolerance(op) {
                    None => max == 0,
                    Some((m, p)) => mean < m && p99 <= p,
                };
                if !ok {
                    failures.push(format!(
                        "{iname} {oname} m={magnitude} negate={negate} {interpolation:?}: mean {mean:.3} max {max} p99 {p99}"
                    ));
                }
            }
        }
    }
    for (op, (n, exact, mean, max)) in &report {
        eprintln!("{op:22} {exact:3}/{n:3} exact, worst mean {mean:.4}, worst max {max}");
    }
    assert!(
        failures.is_empty(),
        "{} variants differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn mixup_and_cutmix_match_timm() {
    let g = json();
    let m = &g["mix"];
    let labels: Vec<u32> = m["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let num_classes = m["num_classes"].as_u64().unwrap() as usize;
    let smoothing = m["smoothing"].as_f64().unwrap();
    // timm's batch is CHW per image; ours is HWC.
    let chw: Vec<Vec<Vec<Vec<u8>>>> = serde_json::from_value(m["batch"].clone()).unwrap();
    let (b, c, h, w) = (chw.len(), chw[0].len(), chw[0][0].len(), chw[0][0][0].len());
    let to_hwc = |x: &Vec<Vec<Vec<Vec<u8>>>>| -> Vec<u8> {
        let mut out = Vec::with_capacity(b * h * w * c);
        for img in x {
            for y in 0..h {
                for xx in 0..w {
                    for ch in img.iter().take(c) {
                        out.push(ch[y][xx]);
                    }
                }
            }
        }
        out
    };
    let batch = to_hwc(&chw);
    for case in m["cases"].as_array().unwrap() {
        let lam = case["lam"].as_f64().unwrap();
        let draw = if case["cutmix"].as_bool().unwrap() {
            let centre: Vec<usize> = serde_json::from_value(case["centre"].clone()).unwrap();
            let (bx, lam_c) = mix::cutmix_box(h, w, lam, centre[0], centre[1]);
            let want: Vec<usize> = serde_json::from_value(case["box"].clone()).unwrap();
            assert_eq!(
                bx,
                CutBox {
                    y0: want[0],
                    y1: want[1],
                    x0: want[2],
                    x1: want[3]
                },
                "box for lam {lam}, centre {centre:?}"
            );
            assert_eq!(lam_c, case["lam_corrected"].as_f64().unwrap());
            MixDraw {
                lam: lam_c,
                kind: MixKind::CutMix(bx),
            }
        } else {
            MixDraw {
                lam,
                kind: MixKind::Mixup,
            }
        };
        let mut got = batch.clone();
        mix::mix_u8_batch(&mut got, b, h, w, c, &draw);
        let mixed: Vec<Vec<Vec<Vec<u8>>>> = serde_json::from_value(case["mixed"].clone()).unwrap();
        assert_eq!(got, to_hwc(&mixed), "images for {case}");
        let targets = mix::mixed_targets(&labels, num_classes, draw.lam, smoothing);
        let want: Vec<f32> = case["target"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(targets, want, "targets for lam {}", draw.lam);
    }
}
