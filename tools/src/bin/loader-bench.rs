//! `loader-bench --data SHARDS`: loader throughput per thread count and transform, against a
//! plain full decode of the same JPEGs measured in the same run. One JSON line per measurement.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use loader::decode::{CropRequest, DecodeOptions, DecoderKind};
use loader::rng::sample_rng;
use loader::sample::{resize_into, CropMode, SampleProcessor};
use loader::{Loader, LoaderConfig, PlanConfig, Transform};
use serde_json::json;
use tools::bench::{cpu_model, exit_on_error, git_rev, median, print_json_line};

/// Measures images/s of the loader (train or eval transform) and of a plain full decode, for
/// each thread count, on the shards in --data. The first pass over the images warms the page
/// cache and is not reported. Also --fidelity: how far the decoding shortcuts (DCT scaling,
/// region decoding) move the train output from full decode + crop + resize.
#[derive(Parser, Debug)]
#[command(name = "loader-bench")]
struct Args {
    /// Shard set directory (with manifest.json).
    #[arg(long)]
    data: PathBuf,
    /// Split.
    #[arg(long, default_value = "train")]
    split: String,
    /// Transforms to measure, comma-separated: decode, train, eval.
    #[arg(long, default_value = "decode,train,eval", value_delimiter = ',')]
    transform: Vec<String>,
    /// Output size.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// Thread counts, comma-separated (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Images per measurement (default: the whole split).
    #[arg(long)]
    images: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Decoder: turbo or zune.
    #[arg(long)]
    decoder: Option<DecoderKind>,
    /// Turn off DCT-domain scaling.
    #[arg(long)]
    no_dct_scaling: bool,
    /// Turn off region-of-interest decoding.
    #[arg(long)]
    no_region: bool,
    /// Measure the fidelity of the decoding shortcuts instead of speed.
    #[arg(long)]
    fidelity: bool,
    /// Also measure the train transform with this RandAugment config (timm string, e.g.
    /// rand-m7-mstd0.5-inc1), reported as transform "train+ra" beside plain "train".
    #[arg(long)]
    rand_augment: Option<String>,
    /// Repeats per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// First measure the loader transforms from a cold page cache: before each run the split's
    /// files are evicted from the page cache (posix_fadvise, no root needed) and the split is
    /// reopened. Lines carry "cache": "cold"; the usual warm lines follow, then the ratios.
    #[arg(long)]
    cold: bool,
    /// Read the samples in a shuffled order (as training does: random access across shards)
    /// instead of index order.
    #[arg(long)]
    shuffle: bool,
}

/// Resident memory in MiB: `VmRSS` (including the memory-mapped shards' cached pages) or
/// `RssAnon` (the process's own allocations: buffers, decoders).
fn rss_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() -> std::process::ExitCode {
    exit_on_error("loader-bench", run_bench(Args::parse()))
}

fn run_bench(mut a: Args) -> Result<()> {
    let rand_augment = match &a.rand_augment {
        Some(c) => {
            let ra = loader::RandAugment::from_config_str(c).map_err(anyhow::Error::msg)?;
            if !a.transform.iter().any(|t| t == "train") {
                bail!("--rand-augment needs the train transform in --transform");
            }
            let at = a.transform.iter().position(|t| t == "train").unwrap();
            a.transform.insert(at + 1, "train+ra".to_owned());
            Some(Arc::new(ra) as Arc<dyn loader::Augment>)
        }
        None => None,
    };
    if let Some(t) = a
        .transform
        .iter()
        .find(|t| !["decode", "train", "train+ra", "eval"].contains(&t.as_str()))
    {
        bail!("unknown transform {t:?}: expected decode, train or eval");
    }
    let ds = shards::Dataset::open(&a.data)?;
    let split = Arc::new(ds.split(&a.split)?);
    let n_split = split.len() as usize;
    if n_split == 0 {
        bail!("split {:?} is empty", a.split);
    }
    let images = a.images.unwrap_or(n_split).min(n_split);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if a.threads.is_empty() {
        let mut t = vec![1, cores];
        t.dedup();
        t
    } else {
        a.threads.clone()
    };
    let decoder = a.decoder.unwrap_or_else(DecoderKind::fastest);
    let decode_opts = DecodeOptions {
        dct_scaling: !a.no_dct_scaling,
        region: !a.no_region,
    };
    // Without flags, each transform runs with the loader's default shortcuts (eval: no DCT
    // scaling), as `train` will.
    let override_opts = (a.no_dct_scaling || a.no_region).then_some(decode_opts);
    let base = json!({
        "git_rev": git_rev(),
        "cpu_model": cpu_model(), "cores": cores, "data": a.data.display().to_string(),
        "split": a.split, "decoder": format!("{decoder:?}").to_lowercase(),
        "shortcuts": match override_opts {
            Some(o) => format!("dct_scaling={} region={}", o.dct_scaling, o.region),
            None => "loader default (train: dct_scaling + region; eval: region)".to_owned(),
        },
    });
    let emit = |extra: serde_json::Value| print_json_line(&base, extra);

    if a.fidelity {
        return fidelity(&split, images, a.size, decoder, decode_opts, &emit);
    }

    // Cold page cache first: the split unmapped, its files evicted, reopened for each run.
    let mut cold_ips: std::collections::BTreeMap<(String, usize), f64> = Default::default();
    if a.cold {
        // Bytes of the JPEGs a run reads (from the index; no data page is touched).
        let mut jpeg_bytes = 0u64;
        for i in 0..images {
            jpeg_bytes += split.get(i as u64)?.jpeg.len() as u64;
        }
        drop(split);
        let dir = a.data.join(&a.split);
        for t in &threads {
            for tr in a.transform.iter().filter(|t| *t == "train" || *t == "eval") {
                let mut runs = Vec::new();
                let mut evicted = 0;
                for _ in 0..a.repeats {
                    evicted = tools::bench::evict_from_page_cache(&dir)?;
                    let split = Arc::new(shards::Dataset::open(&a.data)?.split(&a.split)?);
                    let transform = if tr == "eval" {
                        Transform::eval(a.size)
                    } else {
                        Transform::train(a.size)
                    };
                    let (secs, _, _) = run_loader(
                        &split,
                        images,
                        *t,
                        transform,
                        None,
                        a.batch_size,
                        decoder,
                        override_opts,
                        a.shuffle,
                    )?;
                    runs.push(secs);
                }
                let secs = median(runs);
                cold_ips.insert((tr.clone(), *t), images as f64 / secs);
                emit(json!({
                    "transform": tr, "size": a.size, "threads": t, "images": images,
                    "cache": "cold", "evicted_bytes": evicted, "shuffle": a.shuffle, "seconds": secs,
                    "images_per_s": images as f64 / secs,
                    "jpeg_mb_per_s": jpeg_bytes as f64 / 1e6 / secs,
                }));
            }
        }
    }
    let split = Arc::new(ds.split(&a.split)?);

    // Warm the page cache.
    for i in 0..images {
        std::hint::black_box(split.get(i as u64)?.jpeg.iter().step_by(4096).count());
    }
    let (rss_start, anon_start) = (rss_mb("VmRSS:"), rss_mb("RssAnon:"));
    let mut per_core: std::collections::BTreeMap<(String, usize), f64> = Default::default();
    for t in &threads {
        for tr in &a.transform {
            let mut runs = Vec::new();
            let mut stages = None;
            for _ in 0..a.repeats {
                let (secs, st) = match tr.as_str() {
                    "decode" => (decode_only(&split, images, *t, decoder)?, None),
                    "train" | "train+ra" | "eval" => {
                        let transform = if tr == "eval" {
                            Transform::eval(a.size)
                        } else {
                            Transform::train(a.size)
                        };
                        let augment = if tr == "train+ra" {
                            rand_augment.clone()
                        } else {
                            None
                        };
                        let (s, st, anon) = run_loader(
                            &split,
                            images,
                            *t,
                            transform,
                            augment,
                            a.batch_size,
                            decoder,
                            override_opts,
                            a.shuffle,
                        )?;
                        (s, Some((st, anon)))
                    }
                    other => bail!("unknown transform {other:?}: expected decode, train or eval"),
                };
                runs.push(secs);
                stages = st;
            }
            let secs = median(runs);
            let ips = images as f64 / secs;
            per_core.insert((tr.clone(), *t), ips / *t as f64);
            if let Some(cold) = cold_ips.get(&(tr.clone(), *t)) {
                emit(
                    json!({ "ratio": "cold_over_warm", "transform": tr, "threads": t,
                    "size": a.size, "images_per_s_ratio": cold / ips }),
                );
            }
            let mut line = json!({
                "cache": "warm", "shuffle": a.shuffle,
                "transform": tr, "size": if tr == "decode" { 0 } else { a.size }, "threads": t,
                "images": images, "seconds": secs, "images_per_s": ips,
                "images_per_s_per_core": ips / *t as f64, "rss_anon_mb": rss_mb("RssAnon:"),
            });
            if let Some((st, (anon_first, anon_last))) = stages {
                let ms = |s: f64| s * 1e3 / images as f64;
                line.as_object_mut().unwrap().extend(
                    json!({
                        "read_ms_per_image": ms(st.read_s), "decode_ms_per_image": ms(st.decode_s),
                        "resize_ms_per_image": ms(st.resize_s), "augment_ms_per_image": ms(st.augment_s),
                        "collate_ms_per_image": ms(st.collate_s),
                        "rss_anon_mb_first_batch": anon_first, "rss_anon_mb_last_batch": anon_last,
                    })
                    .as_object()
                    .unwrap()
                    .clone(),
                );
            }
            emit(line);
        }
    }
    for t in &threads {
        let Some(dec) = per_core.get(&("decode".to_owned(), *t)) else {
            continue;
        };
        for tr in ["train", "train+ra", "eval"] {
            if let Some(x) = per_core.get(&(tr.to_owned(), *t)) {
                emit(
                    json!({ "ratio": format!("{tr}_over_decode"), "threads": t, "size": a.size,
                    "per_core_ratio": x / dec }),
                );
            }
        }
    }
    // RandAugment's cost: extra time per image over the plain train transform, same run.
    for t in &threads {
        let plain = per_core.get(&("train".to_owned(), *t));
        let ra = per_core.get(&("train+ra".to_owned(), *t));
        if let (Some(plain), Some(ra)) = (plain, ra) {
            emit(
                json!({ "ratio": "train_time_added_by_rand_augment", "threads": t,
                "size": a.size, "rand_augment": a.rand_augment, "added_fraction": plain / ra - 1.0 }),
            );
        }
    }
    emit(
        json!({ "memory": "rss", "rss_mb_start": rss_start, "rss_mb_end": rss_mb("VmRSS:"),
        "rss_anon_mb_start": anon_start, "rss_anon_mb_end": rss_mb("RssAnon:") }),
    );
    Ok(())
}

/// Full decodes of the first `images` samples on `threads` threads; returns seconds.
fn decode_only(
    split: &shards::Split,
    images: usize,
    threads: usize,
    decoder: DecoderKind,
) -> Result<f64> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut p = SampleProcessor::new(
                        Transform::train(224),
                        decoder,
                        DecodeOptions::default(),
                        None,
                    )
                    .map_err(anyhow::Error::msg)?;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= images {
                            return Ok(());
                        }
                        let s = split.get(i as u64)?;
                        p.decode_only(s.jpeg)
                            .map_err(anyhow::Error::msg)
                            .with_context(|| s.key.to_owned())?;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("decode thread panicked")?;
        }
        Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// The loader over the first `images` samples (a plan over the whole split, cut short).
#[allow(clippy::too_many_arguments)]
fn run_loader(
    split: &Arc<shards::Split>,
    images: usize,
    threads: usize,
    transform: Transform,
    augment: Option<Arc<dyn loader::Augment>>,
    batch_size: usize,
    decoder: DecoderKind,
    decode: Option<DecodeOptions>,
    shuffle: bool,
) -> Result<(f64, loader::StageSeconds, (f64, f64))> {
    let mut plan = PlanConfig::new(images as u64, batch_size);
    plan.shuffle = shuffle;
    let mut cfg = LoaderConfig::new(transform, plan);
    cfg.num_workers = threads;
    cfg.decoder = decoder;
    if let Some(d) = decode {
        cfg.decode = d;
    }
    let mut l = Loader::new_with(split.clone(), cfg, augment)?;
    let start = Instant::now();
    let mut seen = 0;
    let mut anon_first = 0.0;
    for b in l.epoch(0)? {
        let b = b?;
        if seen == 0 {
            anon_first = rss_mb("RssAnon:");
        }
        seen += b.len;
        std::hint::black_box(b.images()[0]);
    }
    let anon_last = rss_mb("RssAnon:");
    assert_eq!(seen, images, "the loader delivered every planned image");
    let secs = start.elapsed().as_secs_f64();
    Ok((secs, l.stage_seconds(), (anon_first, anon_last)))
}

/// Shortcut decode versus full decode, same crop and filter: mean and 99th percentile of the
/// absolute difference in levels over all output bytes, and how often each scale was used.
fn fidelity(
    split: &shards::Split,
    images: usize,
    size: u32,
    decoder: DecoderKind,
    opts: DecodeOptions,
    emit: &dyn Fn(serde_json::Value),
) -> Result<()> {
    let transform = Transform::train(size);
    let full = SampleProcessor::new(
        transform.clone(),
        decoder,
        DecodeOptions {
            dct_scaling: false,
            region: false,
        },
        None,
    )
    .map_err(anyhow::Error::msg)?;
    let mut dec_full = loader::decode::Decoder::new(decoder).map_err(anyhow::Error::msg)?;
    let mut dec_fast = loader::decode::Decoder::new(decoder).map_err(anyhow::Error::msg)?;
    let mut resizer = fast_image_resize::Resizer::new();
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    let n = (size * size * 3) as usize;
    let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
    let mut hist = [0u64; 256];
    let mut scales = [0u64; 9];
    for i in 0..images {
        let s = split.get(i as u64)?;
        let (w, h) = dec_full.size(s.jpeg).map_err(anyhow::Error::msg)?;
        let g = full.geometry(w, h, &mut sample_rng(0, 0, i as u64));
        let request = Some(CropRequest {
            crop: g.crop,
            size,
            in_image: false,
        });
        let full_opts = DecodeOptions {
            dct_scaling: false,
            region: false,
        };
        let ra = dec_full
            .decode(s.jpeg, request, full_opts, &mut sa)
            .map_err(anyhow::Error::msg)?;
        let rb = dec_fast
            .decode(s.jpeg, request, opts, &mut sb)
            .map_err(anyhow::Error::msg)?;
        scales[rb.scale_num as usize] += 1;
        resize_into(
            &mut resizer,
            &sa,
            (ra.width, ra.height),
            ra.crop,
            CropMode::Isolated,
            g.interpolation,
            size,
            &mut a,
        )
        .map_err(anyhow::Error::msg)?;
        resize_into(
            &mut resizer,
            &sb,
            (rb.width, rb.height),
            rb.crop,
            CropMode::Isolated,
            g.interpolation,
            size,
            &mut b,
        )
        .map_err(anyhow::Error::msg)?;
        for (x, y) in a.iter().zip(&b) {
            hist[x.abs_diff(*y) as usize] += 1;
        }
    }
    let total: u64 = hist.iter().sum();
    let mean = hist
        .iter()
        .enumerate()
        .map(|(d, c)| d as f64 * *c as f64)
        .sum::<f64>()
        / total as f64;
    let pct = |q: f64| {
        let mut acc = 0;
        for (d, c) in hist.iter().enumerate() {
            acc += c;
            if acc as f64 >= q * total as f64 {
                return d;
            }
        }
        255
    };
    emit(json!({
        "fidelity": "shortcuts_vs_full_decode", "transform": "train", "size": size, "images": images,
        "mean_abs_diff": mean, "p99_abs_diff": pct(0.99), "p999_abs_diff": pct(0.999),
        "max_abs_diff": hist.iter().rposition(|&c| c > 0).unwrap_or(0),
        "scale_eighths_histogram": scales[1..].to_vec(),
    }));
    Ok(())
}
