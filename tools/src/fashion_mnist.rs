//! Fashion-MNIST (Zalando, 2017) as an ImageNet-style folder, so that the whole pipeline
//! (`shard-imagenet`, the loader, the trainer) can be exercised on a real, learnable data set
//! that Debian ships (`dataset-fashion-mnist`, in `/usr/share/datasets/fashion-mnist/`).
//!
//! Input: the four IDX files of the original distribution, gzip-compressed (`*.gz`, as Debian
//! ships them) or plain, recognised by content:
//!
//! ```text
//! train-images-idx3-ubyte[.gz]   magic 0x00000803, count, rows, cols, then count*rows*cols u8
//! train-labels-idx1-ubyte[.gz]   magic 0x00000801, count, then count u8 labels (0..=9)
//! t10k-images-idx3-ubyte[.gz]    the same for the 10,000 test images
//! t10k-labels-idx1-ubyte[.gz]
//! ```
//!
//! Output (the test set becomes `val/`, in class folders, which `shard-imagenet` accepts):
//!
//! ```text
//! OUT/train/c0_tshirt_top/00000.JPEG ...   index in the IDX file, zero-padded to 5 digits
//! OUT/val/c9_ankle_boot/00000.JPEG ...
//! OUT/LOC_synset_mapping.txt               "c0_tshirt_top T-shirt/top" per line (class names)
//! ```
//!
//! Images are single-component (greyscale) baseline JPEGs: the loader expands them to RGB with
//! equal channels, and they are a third smaller than the same image stored as RGB. Fashion-MNIST
//! draws the garment light on black (as MNIST); the pixels are kept as they are. Output is
//! byte-identical for the same input and options, whatever the thread count.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fast_image_resize as fr;

use crate::progress::Progress;

/// Class folder names, in label order (sorted, so `shard-imagenet` gives them the same labels).
pub const CLASS_DIRS: [&str; 10] = [
    "c0_tshirt_top",
    "c1_trouser",
    "c2_pullover",
    "c3_dress",
    "c4_coat",
    "c5_sandal",
    "c6_shirt",
    "c7_sneaker",
    "c8_bag",
    "c9_ankle_boot",
];

/// Class names as the Fashion-MNIST README gives them, in label order.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// IDX magic number of an unsigned-byte, 3-dimensional file (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic number of an unsigned-byte, 1-dimensional file (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The two splits: output folder name and the IDX file name stem of its images and labels.
pub const SPLITS: [(&str, &str); 2] = [("train", "train"), ("val", "t10k")];

/// The images of one IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows (height) of each image.
    pub rows: u32,
    /// Columns (width) of each image.
    pub cols: u32,
    /// `count * rows * cols` bytes, image after image, rows top to bottom.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows as usize * self.cols as usize;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// The largest IDX file (after gunzipping) the reader accepts: 768 MiB. Fashion-MNIST's
/// largest is 47 MB, EMNIST's 547 MB; the limit keeps a small gzip file that inflates without
/// end (a "zip bomb": deflate reaches 1032:1) from taking all memory.
pub const MAX_IDX_BYTES: u64 = 768 << 20;

/// Reads a whole file, gunzipping it if it starts with the gzip magic bytes; at most
/// [`MAX_IDX_BYTES`] either way.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let too_big = |how: &str| {
        anyhow::anyhow!(
            "{}: more than {MAX_IDX_BYTES} bytes{how}, the limit for an IDX file (not an IDX file?)",
            path.display()
        )
    };
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_IDX_BYTES {
        return Err(too_big(""));
    }
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 2);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("{}: cannot gunzip", path.display()))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(too_big(" when gunzipped"));
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks the header (`magic`, then `dims` big-endian u32 sizes) and the payload length; returns
/// the sizes.
fn parse_idx(path: &Path, bytes: &[u8], magic: u32, what: &str, dims: usize) -> Result<Vec<u32>> {
    let header = 4 + 4 * dims;
    let too_short = |what: &str| {
        anyhow::anyhow!(
            "{}: {} bytes, too short for an IDX {what} header ({header} bytes)",
            path.display(),
            bytes.len()
        )
    };
    if bytes.len() < 4 {
        return Err(too_short(what));
    }
    let found = be_u32(bytes, 0);
    if found != magic {
        let hint = match found {
            IMAGES_MAGIC => " (this is an images file)",
            LABELS_MAGIC => " (this is a labels file)",
            _ => "",
        };
        bail!(
            "{}: bad magic number 0x{found:08x}, expected 0x{magic:08x} (IDX {what}){hint}",
            path.display()
        );
    }
    if bytes.len() < header {
        return Err(too_short(what));
    }
    let sizes: Vec<u32> = (0..dims).map(|d| be_u32(bytes, 4 + 4 * d)).collect();
    // u128: three u32 sizes multiply to up to 2^96 (a u64 product overflowed: fuzzing finding,
    // fuzz/regressions/idx/).
    let payload: u128 = sizes.iter().map(|&s| s as u128).product();
    let found = (bytes.len() - header) as u128;
    if found != payload {
        let shape: Vec<String> = sizes.iter().map(u32::to_string).collect();
        bail!(
            "{}: header says {} ({} bytes of data), found {found} bytes after the header{}",
            path.display(),
            shape.join(" x "),
            payload,
            if found < payload { " (truncated?)" } else { "" }
        );
    }
    Ok(sizes)
}

/// Reads an IDX images file (plain or gzip-compressed) and checks its magic number and length.
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let mut bytes = read_maybe_gz(path)?;
    let sizes = parse_idx(path, &bytes, IMAGES_MAGIC, "images", 3)?;
    let (count, rows, cols) = (sizes[0] as usize, sizes[1], sizes[2]);
    if count > 0 && (rows == 0 || cols == 0 || rows > 65_535 || cols > 65_535) {
        bail!(
            "{}: images of {rows} x {cols} pixels, expected 1 to 65535 on each side",
            path.display()
        );
    }
    bytes.drain(..16);
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: bytes,
    })
}

/// Reads an IDX labels file (plain or gzip-compressed) and checks its magic number, its length
/// and that every label is below `num_classes`.
pub fn read_idx_labels(path: &Path, num_classes: usize) -> Result<Vec<u8>> {
    let mut bytes = read_maybe_gz(path)?;
    parse_idx(path, &bytes, LABELS_MAGIC, "labels", 1)?;
    bytes.drain(..8);
    if let Some(i) = bytes.iter().position(|&l| l as usize >= num_classes) {
        bail!(
            "{}: label {} at index {i}, expected 0 to {}",
            path.display(),
            bytes[i],
            num_classes - 1
        );
    }
    Ok(bytes)
}

/// `dir/name.gz` if it exists, else `dir/name`; an error naming both if neither does.
pub fn find_idx_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    let plain = dir.join(name);
    if gz.is_file() {
        Ok(gz)
    } else if plain.is_file() {
        Ok(plain)
    } else {
        bail!(
            "{}: found neither {name}.gz nor {name}: expected the Fashion-MNIST IDX files (Debian: /usr/share/datasets/fashion-mnist)",
            dir.display()
        )
    }
}

/// Settings of [`import`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Resize every image to this many pixels square (bilinear), or keep 28 x 28.
    pub upscale_px: Option<u32>,
    /// Keep only the first N images of each class (in file order), per split.
    pub limit_per_class: Option<usize>,
    /// JPEG quality (1 to 100).
    pub quality: u8,
    /// Encoding threads.
    pub threads: usize,
    /// No progress output.
    pub quiet: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            upscale_px: None,
            limit_per_class: None,
            quality: 95,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            quiet: true,
        }
    }
}

/// What one split of [`import`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitSummary {
    /// `train` or `val`.
    pub name: String,
    /// Images in the IDX file.
    pub num_source: usize,
    /// Files written per class, in label order.
    pub num_per_class: Vec<usize>,
    /// Bytes of JPEG written.
    pub bytes: u64,
}

impl SplitSummary {
    /// Files written.
    pub fn num_files(&self) -> usize {
        self.num_per_class.iter().sum()
    }
}

/// What [`import`] wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// Train, then val.
    pub splits: Vec<SplitSummary>,
    /// Image side in pixels.
    pub size_px: u32,
    /// Wall time.
    pub seconds: f64,
}

struct Job {
    index: usize,
    label: usize,
}

/// Resizes a greyscale image to `side` x `side`, bilinear (antialiased when shrinking).
fn resize_grey(pixels: &[u8], cols: u32, rows: u32, side: u32) -> Result<Vec<u8>> {
    let src = fr::images::ImageRef::new(cols, rows, pixels, fr::PixelType::U8)
        .context("resize source")?;
    let mut dst = fr::images::Image::new(side, side, fr::PixelType::U8);
    fr::Resizer::new()
        .resize(
            &src,
            &mut dst,
            &fr::ResizeOptions::new()
                .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear)),
        )
        .context("resize")?;
    Ok(dst.into_vec())
}

fn encode_grey(pixels: &[u8], side_w: u32, side_h: u32, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(1024);
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(
            pixels,
            side_w as u16,
            side_h as u16,
            jpeg_encoder::ColorType::Luma,
        )
        .context("encoding JPEG")?;
    Ok(out)
}

/// Reads the four IDX files in `src` (see the module docs) and writes the ImageNet-style folder
/// `out` (which must not already hold `train/` or `val/`). Every file is validated before
/// anything is written.
pub fn import(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportSummary> {
    let start = Instant::now();
    if !(1..=100).contains(&opts.quality) {
        bail!("--quality {} is out of range 1 to 100", opts.quality);
    }
    if let Some(px) = opts.upscale_px {
        if !(1..=4096).contains(&px) {
            bail!("--upscale {px} is out of range 1 to 4096");
        }
    }
    for (split, _) in SPLITS {
        if out.join(split).exists() {
            bail!(
                "{} already exists: choose a new output directory or delete it",
                out.join(split).display()
            );
        }
    }
    // Read and check everything first.
    let mut data: Vec<(&str, IdxImages, Vec<u8>)> = Vec::new();
    for (split, stem) in SPLITS {
        let images_path = find_idx_file(src, &format!("{stem}-images-idx3-ubyte"))?;
        let labels_path = find_idx_file(src, &format!("{stem}-labels-idx1-ubyte"))?;
        let images = read_idx_images(&images_path)?;
        let labels = read_idx_labels(&labels_path, CLASS_DIRS.len())?;
        if images.count != labels.len() {
            bail!(
                "{} holds {} images but {} holds {} labels: expected one label per image",
                images_path.display(),
                images.count,
                labels_path.display(),
                labels.len()
            );
        }
        if let Some((_, first, _)) = data.first() {
            if (first.rows, first.cols) != (images.rows, images.cols) {
                bail!(
                    "{}: images of {} x {}, expected {} x {} as in the training set",
                    images_path.display(),
                    images.rows,
                    images.cols,
                    first.rows,
                    first.cols
                );
            }
        }
        data.push((split, images, labels));
    }
    let (rows, cols) = (data[0].1.rows, data[0].1.cols);
    let (out_w, out_h) = opts.upscale_px.map_or((cols, rows), |px| (px, px));
    if out_w > 65_535 || out_h > 65_535 {
        bail!("images of {out_w} x {out_h} do not fit a JPEG");
    }

    let mut splits = Vec::new();
    for (split, images, labels) in &data {
        let mut jobs = Vec::new();
        let mut per_class = vec![0usize; CLASS_DIRS.len()];
        for (index, &label) in labels.iter().enumerate() {
            let label = label as usize;
            if opts.limit_per_class.is_some_and(|n| per_class[label] >= n) {
                continue;
            }
            per_class[label] += 1;
            jobs.push(Job { index, label });
        }
        for dir in CLASS_DIRS {
            let d = out.join(split).join(dir);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut progress = Progress::new(split, jobs.len() as u64, opts.quiet);
        let next = AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..opts.threads.max(1))
                .map(|_| {
                    let tx = tx.clone();
                    let (jobs, next) = (&jobs, &next);
                    scope.spawn(move || -> Result<()> {
                        loop {
                            let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                return Ok(());
                            };
                            let pixels = images.image(job.index);
                            let resized;
                            let pixels = match opts.upscale_px {
                                Some(px) if (px, px) != (cols, rows) => {
                                    resized = resize_grey(pixels, cols, rows, px)?;
                                    &resized[..]
                                }
                                _ => pixels,
                            };
                            let jpeg = encode_grey(pixels, out_w, out_h, opts.quality)?;
                            let path = out
                                .join(split)
                                .join(CLASS_DIRS[job.label])
                                .join(format!("{:05}.JPEG", job.index));
                            std::fs::write(&path, &jpeg)
                                .with_context(|| format!("writing {}", path.display()))?;
                            // The receiver outlives the workers; a send cannot fail.
                            let _ = tx.send(jpeg.len() as u64);
                        }
                    })
                })
                .collect();
            drop(tx);
            let mut bytes = 0;
            for b in rx.iter() {
                bytes += b;
                progress.add(1, b);
            }
            progress.finish();
            splits.push(SplitSummary {
                name: split.to_string(),
                num_source: images.count,
                num_per_class: per_class.clone(),
                bytes,
            });
            workers
                .into_iter()
                .map(|w| w.join().expect("encoder thread panicked"))
                .collect()
        });
        for r in results {
            r?;
        }
    }
    let synsets: String = CLASS_DIRS
        .iter()
        .zip(CLASS_NAMES)
        .map(|(d, n)| format!("{d} {n}\n"))
        .collect();
    let synsets_path = out.join("LOC_synset_mapping.txt");
    std::fs::write(&synsets_path, synsets)
        .with_context(|| format!("writing {}", synsets_path.display()))?;
    Ok(ImportSummary {
        splits,
        size_px: out_w,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, sizes: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for s in sizes {
            v.extend_from_slice(&s.to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_plain_and_gzip_images_alike() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8).collect();
        let bytes = idx(IMAGES_MAGIC, &[2, 3, 4], &pixels);
        let plain = dir.path().join("a");
        std::fs::write(&plain, &bytes).unwrap();
        let gz = dir.path().join("a.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &bytes).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        for p in [&plain, &gz] {
            let im = read_idx_images(p).unwrap();
            assert_eq!((im.count, im.rows, im.cols), (2, 3, 4));
            assert_eq!(im.image(1), &pixels[12..]);
        }
        assert_eq!(find_idx_file(dir.path(), "a").unwrap(), gz);
    }

    #[test]
    fn errors_name_the_file_and_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let err = |bytes: &[u8], images: bool| {
            std::fs::write(&p, bytes).unwrap();
            let e = if images {
                read_idx_images(&p).map(|_| ())
            } else {
                read_idx_labels(&p, 10).map(|_| ())
            };
            format!("{:#}", e.unwrap_err())
        };
        let name = p.display().to_string();
        assert_eq!(
            err(&idx(LABELS_MAGIC, &[1], &[0]), true),
            format!("{name}: bad magic number 0x00000801, expected 0x00000803 (IDX images) (this is a labels file)")
        );
        assert_eq!(
            err(&idx(IMAGES_MAGIC, &[2, 2, 2], &[0; 7]), true),
            format!("{name}: header says 2 x 2 x 2 (8 bytes of data), found 7 bytes after the header (truncated?)")
        );
        assert_eq!(
            err(&[0, 0, 8], true),
            format!("{name}: 3 bytes, too short for an IDX images header (16 bytes)")
        );
        assert_eq!(
            err(&idx(LABELS_MAGIC, &[3], &[1, 10, 2]), false),
            format!("{name}: label 10 at index 1, expected 0 to 9")
        );
        // Sizes whose product overflows u64 (a fuzzing finding: the product panicked).
        assert_eq!(
            err(&idx(IMAGES_MAGIC, &[0x0102b4d9, 0x03284d72, 0x97bce10b], &[0x30, 0x55]), true),
            format!(
                "{name}: header says 16954585 x 52972914 x 2545737995 (2286413270800592873666550 bytes of data), found 2 bytes after the header (truncated?)"
            )
        );
        let e = find_idx_file(dir.path(), "y").unwrap_err().to_string();
        assert!(e.contains("found neither y.gz nor y"), "{e}");
    }
}
