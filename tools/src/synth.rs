//! `make-imagenet-like`: an ImageNet-shaped folder of real JPEG files that a small network can
//! learn, generated deterministically from a seed.
//!
//! Each class has its own shape, texture and colour; each image draws the object's position,
//! scale, rotation and colour jitter, the background (a gradient between two random colours)
//! and per-pixel noise. Sizes follow ImageNet: shorter side 300 to 500 px, aspect 3:4 to 4:3,
//! with about 3 % small images and 2 % very wide ones. JPEGs are baseline, quality 90, 4:2:0.
//! With `oddities`, the training set also gets one file of each kind ImageNet is known to
//! contain or that a loader must survive: a CMYK JPEG, a PNG named `.JPEG`, a greyscale JPEG, a
//! progressive JPEG and a truncated JPEG.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use loader::rng::Rng;

/// How the validation split is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValLayout {
    /// `val/<wnid>/*.JPEG`.
    Folders,
    /// Flat `val/` plus Kaggle's `LOC_val_solution.csv`.
    Kaggle,
    /// Flat `val/` plus `val_labels.txt` with `file wnid` lines.
    Text,
}

impl std::str::FromStr for ValLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "folders" => Ok(ValLayout::Folders),
            "kaggle" => Ok(ValLayout::Kaggle),
            "text" => Ok(ValLayout::Text),
            _ => Err(format!(
                "unknown val layout {s:?}: expected folders, kaggle or text"
            )),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Number of classes.
    pub classes: usize,
    /// Training images per class.
    pub per_class: usize,
    /// Validation images per class.
    pub val_per_class: usize,
    /// Seed: the output is a function of the options.
    pub seed: u64,
    /// Add the odd files (CMYK, PNG, greyscale, progressive, truncated) to train.
    pub oddities: bool,
    /// Validation layout.
    pub val_layout: ValLayout,
    /// JPEG quality.
    pub quality: u8,
    /// Threads.
    pub threads: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            classes: 10,
            per_class: 100,
            val_per_class: 20,
            seed: 0,
            oddities: false,
            val_layout: ValLayout::Kaggle,
            quality: 90,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// The WordNet-like id of class `c`: `n9` and seven digits, so ids sort in class order.
pub fn wnid(c: usize) -> String {
    format!("n9{c:07}")
}

const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "ring", "cross", "diamond", "star", "bar",
];
const TEXTURES: [&str; 4] = ["plain", "striped", "checkered", "dotted"];

/// The class's description, as written to the synset file.
pub fn class_name(c: usize) -> String {
    let hue = class_hue(c);
    let colour = [
        "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink",
    ][((hue * 8.0) as usize).min(7)];
    format!(
        "{colour} {} {}",
        TEXTURES[(c / SHAPES.len()) % TEXTURES.len()],
        SHAPES[c % SHAPES.len()]
    )
}

fn class_hue(c: usize) -> f64 {
    (c as f64 * 0.618_033_988_75 + 0.05).fract()
}

fn hsv(h: f64, s: f64, v: f64) -> [f64; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as u32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Draws an image size like ImageNet's.
fn draw_size(rng: &mut Rng) -> (u32, u32) {
    let r = rng.f64();
    let (short, aspect) = if r < 0.03 {
        (
            rng.uniform(40.0, 160.0),
            rng.uniform(0.75f64.ln(), (4.0f64 / 3.0).ln()).exp(),
        )
    } else if r < 0.05 {
        (rng.uniform(150.0, 300.0), rng.uniform(2.5, 4.0))
    } else {
        (
            rng.uniform(300.0, 500.0),
            rng.uniform(0.75f64.ln(), (4.0f64 / 3.0).ln()).exp(),
        )
    };
    let long = short * aspect.max(1.0 / aspect);
    if aspect >= 1.0 {
        (long.round() as u32, short.round() as u32)
    } else {
        (short.round() as u32, long.round() as u32)
    }
}

fn inside(shape: usize, u: f64, v: f64) -> bool {
    match shape {
        0 => u * u + v * v < 1.0,
        1 => u.abs().max(v.abs()) < 0.8,
        2 => v < 0.6 && v > -0.9 + 1.76 * u.abs(),
        3 => {
            let r2 = u * u + v * v;
            r2 < 1.0 && r2 > 0.3
        }
        4 => (u.abs() < 0.3 && v.abs() < 0.9) || (v.abs() < 0.3 && u.abs() < 0.9),
        5 => u.abs() + v.abs() < 1.0,
        6 => {
            let r = (u * u + v * v).sqrt();
            r < 0.5 + 0.45 * (5.0 * v.atan2(u)).cos()
        }
        _ => u * u + (v / 0.4) * (v / 0.4) < 1.0,
    }
}

/// Renders an image of class `class` as RGB pixels (width, height, data), deterministically
/// from `rng`.
pub fn render(class: usize, rng: &mut Rng) -> (u32, u32, Vec<u8>) {
    let (w, h) = draw_size(rng);
    let shape = class % SHAPES.len();
    let texture = (class / SHAPES.len()) % TEXTURES.len();
    let hue = class_hue(class) + rng.uniform(-0.03, 0.03);
    let fg = hsv(hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 1.0));
    let fg2 = hsv(hue + 0.5, 0.5, rng.uniform(0.2, 0.5));
    let bg1 = hsv(rng.f64(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.9));
    let bg2 = hsv(rng.f64(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.9));
    let dir = rng.uniform(0.0, std::f64::consts::TAU);
    let (dx, dy) = (dir.cos(), dir.sin());
    let short = w.min(h) as f64;
    let scale = short * rng.uniform(0.18, 0.4);
    let cx = rng.uniform(0.25, 0.75) * w as f64;
    let cy = rng.uniform(0.25, 0.75) * h as f64;
    let theta = rng.uniform(0.0, std::f64::consts::TAU);
    let (cos, sin) = (theta.cos() / scale, theta.sin() / scale);
    let freq = rng.uniform(2.5, 4.0);
    let noise_amp = rng.uniform(4.0, 14.0);
    let mut noise = Rng::new(rng.next_u64());
    let mut px = vec![0u8; (w * h * 3) as usize];
    let reach = scale * 1.5;
    for y in 0..h {
        let fy = y as f64;
        for x in 0..w {
            let fx = x as f64;
            let t = ((fx / w as f64 - 0.5) * dx + (fy / h as f64 - 0.5) * dy + 0.5).clamp(0.0, 1.0);
            let mut c = [
                bg1[0] + (bg2[0] - bg1[0]) * t,
                bg1[1] + (bg2[1] - bg1[1]) * t,
                bg1[2] + (bg2[2] - bg1[2]) * t,
            ];
            let (ox, oy) = (fx - cx, fy - cy);
            if ox.abs() < reach && oy.abs() < reach {
                let u = ox * cos + oy * sin;
                let v = -ox * sin + oy * cos;
                if inside(shape, u, v) {
                    let second = match texture {
                        0 => false,
                        1 => (u * freq * 3.0).sin() > 0.0,
                        2 => ((u * freq).floor() + (v * freq).floor()) as i64 % 2 == 0,
                        _ => {
                            let (a, b) = (
                                (u * freq).fract().abs() - 0.5,
                                (v * freq).fract().abs() - 0.5,
                            );
                            a * a + b * b < 0.09
                        }
                    };
                    let shade = 0.85 + 0.15 * u;
                    let src = if second { fg2 } else { fg };
                    c = [src[0] * shade, src[1] * shade, src[2] * shade];
                }
            }
            let n = (noise.next_u64() >> 40) as f64 / (1u64 << 24) as f64 - 0.5;
            let at = ((y * w + x) * 3) as usize;
            for k in 0..3 {
                px[at + k] = (c[k] * 255.0 + n * 2.0 * noise_amp)
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
        }
    }
    (w, h, px)
}

/// The kinds of file the generator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Baseline,
    Cmyk,
    Png,
    Gray,
    Progressive,
    Truncated,
}

struct Item {
    path: PathBuf,
    class: usize,
    stream: u64,
    index: u64,
    kind: FileKind,
}

fn encode(kind: FileKind, w: u32, h: u32, rgb: &[u8], quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(rgb.len() / 10);
    let (w16, h16) = (w as u16, h as u16);
    let jpeg = |out: &mut Vec<u8>, pixels: &[u8], ct, progressive| -> Result<()> {
        let mut enc = jpeg_encoder::Encoder::new(out, quality);
        enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
        enc.set_progressive(progressive);
        enc.encode(pixels, w16, h16, ct).context("encoding JPEG")?;
        Ok(())
    };
    match kind {
        FileKind::Baseline => jpeg(&mut out, rgb, jpeg_encoder::ColorType::Rgb, false)?,
        FileKind::Progressive => jpeg(&mut out, rgb, jpeg_encoder::ColorType::Rgb, true)?,
        FileKind::Truncated => {
            jpeg(&mut out, rgb, jpeg_encoder::ColorType::Rgb, false)?;
            out.truncate(out.len() * 6 / 10);
        }
        FileKind::Gray => {
            let luma: Vec<u8> = rgb
                .chunks_exact(3)
                .map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114) / 1000) as u8)
                .collect();
            jpeg(&mut out, &luma, jpeg_encoder::ColorType::Luma, false)?;
        }
        FileKind::Cmyk => {
            // Plain CMYK of the RGB; the encoder stores it Adobe-inverted with an APP14 marker,
            // as Photoshop does for the CMYK files in ImageNet.
            let cmyk: Vec<u8> = rgb
                .chunks_exact(3)
                .flat_map(|p| {
                    let k = 255 - p[0].max(p[1]).max(p[2]);
                    let ch = |v: u8| {
                        if k == 255 {
                            0
                        } else {
                            ((255 - v - k) as u32 * 255 / (255 - k) as u32) as u8
                        }
                    };
                    [ch(p[0]), ch(p[1]), ch(p[2]), k]
                })
                .collect();
            jpeg(&mut out, &cmyk, jpeg_encoder::ColorType::Cmyk, false)?;
        }
        FileKind::Png => {
            use image::ImageEncoder;
            image::codecs::png::PngEncoder::new(&mut out)
                .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
                .context("encoding PNG")?;
        }
    }
    Ok(out)
}

/// A small sharded set for tests and examples: `classes` x `per_class` training and
/// `val_per_class` validation images (class folders, seeded) generated into `dir/src` and sharded
/// into `dir/shards` (images at most 64 px on the longer side). Returns the shards' directory.
pub fn small_shard_set(
    dir: &Path,
    classes: usize,
    per_class: usize,
    val_per_class: usize,
    seed: u64,
) -> Result<std::path::PathBuf> {
    let src = dir.join("src");
    let synth = SynthOptions {
        classes,
        per_class,
        val_per_class,
        seed,
        val_layout: ValLayout::Folders,
        threads: 2,
        ..Default::default()
    };
    generate(&src, &synth)?;
    let shards = dir.join("shards");
    let opts = crate::sharding::ShardOptions {
        quiet: true,
        threads: 2,
        max_side: Some(64),
        ..Default::default()
    };
    crate::sharding::run(&src, &shards, &opts)?;
    Ok(shards)
}

/// Writes the data set into `out`, which must not already hold `train/` or `val/`.
pub fn generate(out: &Path, opts: &SynthOptions) -> Result<SynthSummary> {
    let start = Instant::now();
    if opts.classes == 0 || opts.per_class == 0 {
        bail!("--classes and --per-class must be at least 1");
    }
    if opts.classes > 10_000_000 {
        bail!(
            "--classes {} is too many (at most 10,000,000)",
            opts.classes
        );
    }
    for d in ["train", "val"] {
        if out.join(d).exists() {
            bail!(
                "{} already exists: choose a new output directory or delete it",
                out.join(d).display()
            );
        }
    }
    let mut items = Vec::new();
    for c in 0..opts.classes {
        let dir = out.join("train").join(wnid(c));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for i in 0..opts.per_class {
            items.push(Item {
                path: dir.join(format!("{}_{}.JPEG", wnid(c), i)),
                class: c,
                stream: 0,
                index: (c * opts.per_class + i) as u64,
                kind: FileKind::Baseline,
            });
        }
    }
    if opts.oddities {
        let odd = [
            (FileKind::Cmyk, "cmyk"),
            (FileKind::Png, "png"),
            (FileKind::Gray, "gray"),
            (FileKind::Progressive, "progressive"),
            (FileKind::Truncated, "truncated"),
        ];
        for (n, (kind, name)) in odd.into_iter().enumerate() {
            let c = n % opts.classes;
            items.push(Item {
                path: out
                    .join("train")
                    .join(wnid(c))
                    .join(format!("{}_{name}.JPEG", wnid(c))),
                class: c,
                stream: 2,
                index: n as u64,
                kind,
            });
        }
    }
    // Validation: numbered like ILSVRC2012_val_00000001, classes in a seeded order.
    let mut val_classes: Vec<usize> = (0..opts.classes)
        .flat_map(|c| std::iter::repeat_n(c, opts.val_per_class))
        .collect();
    Rng::for_item(opts.seed, &[1]).shuffle(&mut val_classes);
    let val_dir = out.join("val");
    std::fs::create_dir_all(&val_dir)?;
    let mut labels = String::new();
    match opts.val_layout {
        ValLayout::Kaggle => labels.push_str("ImageId,PredictionString\n"),
        ValLayout::Folders => {
            for c in 0..opts.classes {
                std::fs::create_dir_all(val_dir.join(wnid(c)))?;
            }
        }
        ValLayout::Text => {}
    }
    for (i, &c) in val_classes.iter().enumerate() {
        let id = format!("ILSVRC2012_val_{:08}", i + 1);
        let path = match opts.val_layout {
            ValLayout::Folders => val_dir.join(wnid(c)).join(format!("{id}.JPEG")),
            ValLayout::Kaggle => {
                labels.push_str(&format!("{id},{} 0 0 10 10\n", wnid(c)));
                val_dir.join(format!("{id}.JPEG"))
            }
            ValLayout::Text => {
                labels.push_str(&format!("{id}.JPEG {}\n", wnid(c)));
                val_dir.join(format!("{id}.JPEG"))
            }
        };
        items.push(Item {
            path,
            class: c,
            stream: 1,
            index: i as u64,
            kind: FileKind::Baseline,
        });
    }
    match opts.val_layout {
        ValLayout::Kaggle => std::fs::write(out.join("LOC_val_solution.csv"), &labels)?,
        ValLayout::Text => std::fs::write(out.join("val_labels.txt"), &labels)?,
        ValLayout::Folders => {}
    }
    let synsets: String = (0..opts.classes)
        .map(|c| format!("{} {}\n", wnid(c), class_name(c)))
        .collect();
    std::fs::write(out.join("LOC_synset_mapping.txt"), synsets)?;

    let next = AtomicUsize::new(0);
    let results: Vec<Result<u64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<u64> {
                    let mut bytes = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else {
                            return Ok(bytes);
                        };
                        let mut rng = Rng::for_item(opts.seed, &[item.stream, item.index]);
                        let (w, h, rgb) = render(item.class, &mut rng);
                        let data = encode(item.kind, w, h, &rgb, opts.quality)?;
                        std::fs::write(&item.path, &data)
                            .with_context(|| format!("writing {}", item.path.display()))?;
                        bytes += data.len() as u64;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("generator thread panicked"))
            .collect()
    });
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    Ok(SynthSummary {
        files: items.len(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
