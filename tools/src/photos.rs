//! `make-photo-set`: an ImageNet-shaped benchmark set cut from real photographs.
//!
//! Decoding speed depends on image content: smooth generated images decode faster than photos.
//! Benchmarks of decoding therefore use crops of real photos (Debian ships some as wallpapers and
//! demo pictures; `scripts/make-photo-set.sh` fetches them): random 4:3 or 3:4 crops, resized to
//! ImageNet-like sizes (mostly 500x375), saved as baseline 4:2:0 JPEGs at quality 95, which puts
//! the mean file size near ImageNet's (about 110 KB).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::convert::{self, Pixels};
use crate::synth::wnid;
use loader::rng::Rng;

/// What to make.
#[derive(Clone, Debug)]
pub struct PhotoSetOptions {
    /// Training images.
    pub train_images: usize,
    /// Validation images.
    pub val_images: usize,
    /// Classes (photo `p` gives class `p % classes`).
    pub classes: usize,
    /// Seed.
    pub seed: u64,
    /// JPEG quality.
    pub quality: u8,
    /// Photos smaller than this on the shorter side are not used.
    pub min_short_side: u32,
    /// Threads.
    pub threads: usize,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct PhotoSetSummary {
    /// Photos used.
    pub photos_used: usize,
    /// Photos passed over, with the reason.
    pub photos_skipped: Vec<(PathBuf, String)>,
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Every `.jpg`, `.jpeg` and `.png` file under `dirs` (directories or files), sorted.
pub fn find_photos(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in dirs {
        let files = if d.is_file() {
            vec![d.clone()]
        } else {
            crate::files_under(d).with_context(|| format!("reading {}", d.display()))?
        };
        out.extend(files.into_iter().filter(|p| {
            p.extension().is_some_and(|x| {
                let x = x.to_string_lossy().to_ascii_lowercase();
                x == "jpg" || x == "jpeg" || x == "png"
            })
        }));
    }
    out.sort();
    Ok(out)
}

/// Cuts one output image from `photo`.
fn cut(photo: &Pixels, rng: &mut Rng, quality: u8) -> Result<Vec<u8>, String> {
    let landscape = rng.chance(0.8);
    let (aw, ah) = if landscape { (4.0, 3.0) } else { (3.0, 4.0) };
    // The largest box of that aspect inside the photo, then a random fraction of its area.
    let (pw, ph) = (photo.width as f64, photo.height as f64);
    let fit = (pw / aw).min(ph / ah);
    let frac = rng.uniform(0.4, 1.0).sqrt();
    let (cw, ch) = (aw * fit * frac, ah * fit * frac);
    let x = rng.uniform(0.0, pw - cw);
    let y = rng.uniform(0.0, ph - ch);
    let long = if rng.chance(0.8) {
        500
    } else {
        rng.range_inclusive(300, 500)
    };
    let short = (long as f64 * 0.75).round() as u32;
    let (ow, oh) = if landscape {
        (long, short)
    } else {
        (short, long)
    };
    let crop = convert::resize_crop(photo, (x, y, cw, ch), ow, oh)?;
    convert::encode_jpeg(&crop, quality)
}

/// Writes `OUT/train/<wnid>/*.JPEG` and `OUT/val/<wnid>/*.JPEG` cut from `photos`.
pub fn make_photo_set(
    photos: &[PathBuf],
    out: &Path,
    opts: &PhotoSetOptions,
) -> Result<PhotoSetSummary> {
    let start = Instant::now();
    if opts.classes == 0 {
        bail!("--classes must be at least 1");
    }
    for d in ["train", "val"] {
        if out.join(d).exists() {
            bail!(
                "{} already exists: choose a new output directory or delete it",
                out.join(d).display()
            );
        }
    }
    // Decode every photo once to learn which are usable (large enough, decodable).
    let mut usable = Vec::new();
    let mut skipped = Vec::new();
    for p in photos {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        match image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok())
        {
            Some((w, h)) if w.min(h) >= opts.min_short_side => usable.push(p.clone()),
            Some((w, h)) => skipped.push((p.clone(), format!("{w}x{h} is too small"))),
            None => skipped.push((p.clone(), "cannot read its size".into())),
        }
    }
    if usable.is_empty() {
        bail!(
            "none of the {} photos is usable (shorter side at least {} px)",
            photos.len(),
            opts.min_short_side
        );
    }
    for c in 0..opts.classes {
        for split in ["train", "val"] {
            std::fs::create_dir_all(out.join(split).join(wnid(c)))?;
        }
    }
    // Output i comes from photo i % P; each worker takes whole photos so each decodes once.
    let total = opts.train_images + opts.val_images;
    let next = AtomicUsize::new(0);
    let results: Vec<Result<(usize, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..opts.threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<(usize, u64)> {
                    let (mut files, mut bytes) = (0, 0);
                    loop {
                        let p = next.fetch_add(1, Ordering::Relaxed);
                        let Some(path) = usable.get(p) else {
                            return Ok((files, bytes));
                        };
                        let data = std::fs::read(path)?;
                        let photo = convert::decode(&data)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                        let photo = if photo.channels == 1 {
                            let rgb = photo.data.iter().flat_map(|&v| [v, v, v]).collect();
                            Pixels {
                                channels: 3,
                                data: rgb,
                                ..photo
                            }
                        } else {
                            photo
                        };
                        for i in (p..total).step_by(usable.len()) {
                            let class = p % opts.classes;
                            let (split, n) = if i < opts.train_images {
                                ("train", i)
                            } else {
                                ("val", i - opts.train_images)
                            };
                            let mut rng = Rng::for_item(opts.seed, &[i as u64]);
                            let jpeg = cut(&photo, &mut rng, opts.quality)
                                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                            let name = format!("{}_{split}_{n}.JPEG", wnid(class));
                            let dst = out.join(split).join(wnid(class)).join(name);
                            std::fs::write(&dst, &jpeg)
                                .with_context(|| format!("writing {}", dst.display()))?;
                            files += 1;
                            bytes += jpeg.len() as u64;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("photo worker panicked"))
            .collect()
    });
    let (mut files, mut bytes) = (0, 0);
    for r in results {
        let (f, b) = r?;
        files += f;
        bytes += b;
    }
    Ok(PhotoSetSummary {
        photos_used: usable.len(),
        photos_skipped: skipped,
        files,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
