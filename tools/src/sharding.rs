//! `shard-imagenet`: from an ImageNet folder to a verified shard set.
//!
//! 1. [`crate::source::scan`] lists classes, files and labels.
//! 2. Each split's files are put in a seeded shuffled order and cut into shards by their source
//!    sizes, so the plan is a pure function of the listing and the options.
//! 3. Worker threads read, sniff and (rarely) convert files, taking chunks of several shards in
//!    turn; each shard has its own writer thread (and SHA-256 thread), which appends its samples
//!    in plan order and finishes the shard under its final name, so several shards are written
//!    side by side. A shard's outcome (converted and skipped files, sizes, checksums) goes to a
//!    small state file in `DST/.shard-imagenet/`, so a second run after an interruption reuses
//!    every finished shard and redoes only the rest.
//! 4. When all shards exist, `report.json` and then `manifest.json` are written. With skipped
//!    files and no `--allow-skips`, the manifest is withheld and the run fails.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shards::{Manifest, ShardInfo, ShardWriter, SplitInfo};

use crate::convert;
use crate::progress::Progress;
use crate::sniff::{sniff, Kind};
use crate::source::{scan, ScanOptions, Source, SourceSample};
use loader::rng::Rng;

/// Name of the report file in DST.
pub const REPORT_FILE: &str = "report.json";
/// Directory in DST holding the per-shard state of an unfinished run.
pub const STATE_DIR: &str = ".shard-imagenet";
/// Environment variable read by tests: abort the process (no cleanup) after this many samples
/// have been written, to prove that an interrupted run leaves no shard that looks whole.
pub const ABORT_ENV: &str = "SHARD_IMAGENET_ABORT_AFTER_SAMPLES";
/// Samples per unit of work handed to a worker thread.
const CHUNK: usize = 16;

/// Options that shape the output (all but `allow_skips`, `threads` and `quiet` enter the plan
/// digest: changing them makes a previous partial run's shards stale).
#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// Target shard size in bytes, counted on source file sizes plus tar overhead.
    pub shard_bytes: u64,
    /// Seed of the sample order; `None` keeps the sorted order.
    pub shuffle_seed: Option<u64>,
    /// Re-encode images whose longer side exceeds this.
    pub max_side: Option<u32>,
    /// JPEG quality of converted and re-encoded images.
    pub quality: u8,
    /// Accept unreadable files (listed in the report) and still write the manifest.
    pub allow_skips: bool,
    /// Worker threads.
    pub threads: usize,
    /// No progress output.
    pub quiet: bool,
    /// Where label and synset files are, if not in SRC.
    pub scan: ScanOptions,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            shard_bytes: 1 << 30,
            shuffle_seed: Some(0),
            max_side: None,
            quality: 95,
            allow_skips: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            quiet: false,
            scan: ScanOptions::default(),
        }
    }
}

/// A file that was converted, re-encoded or skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    /// The input file, relative to SRC.
    pub file: String,
    /// Its key.
    pub key: String,
    /// What happened and why.
    pub what: String,
    /// Size of the input file.
    pub source_bytes: u64,
    /// Size of what was stored (absent for skipped files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
}

/// Per-split counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Samples written.
    pub samples: u64,
    /// Stored with their original bytes.
    pub stored: u64,
    /// Converted to JPEG (CMYK, PNG).
    pub converted: u64,
    /// Re-encoded smaller because of `--max-side`.
    pub resized: u64,
    /// Skipped (unreadable, truncated, unlabelled).
    pub skipped: u64,
    /// Greyscale JPEGs stored as they are.
    pub grayscale: u64,
    /// Progressive JPEGs stored as they are.
    pub progressive: u64,
    /// Bytes of the input files.
    pub source_bytes: u64,
    /// Bytes of the stored images.
    pub stored_bytes: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.samples += o.samples;
        self.stored += o.stored;
        self.converted += o.converted;
        self.resized += o.resized;
        self.skipped += o.skipped;
        self.grayscale += o.grayscale;
        self.progressive += o.progressive;
        self.source_bytes += o.source_bytes;
        self.stored_bytes += o.stored_bytes;
    }
}

/// The state file of one finished shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ShardState {
    plan_digest: String,
    shard: ShardInfo,
    counts: Counts,
    converted: Vec<ReportEntry>,
    skipped: Vec<ReportEntry>,
}

/// `report.json`: everything that was not stored byte for byte.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Per split: counts, converted files, skipped files.
    pub splits: BTreeMap<String, SplitReport>,
}

/// One split of [`Report`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SplitReport {
    /// Counts.
    pub counts: Counts,
    /// Files converted to RGB JPEG (CMYK JPEGs, PNGs).
    pub converted: Vec<ReportEntry>,
    /// Files skipped, with the reason.
    pub skipped: Vec<ReportEntry>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Per split: name, counts, shards, shards reused from an earlier run.
    pub splits: Vec<SplitSummary>,
    /// The output was already complete: nothing was done.
    pub already_complete: bool,
    /// Whether `manifest.json` exists now.
    pub manifest_written: bool,
    /// Files skipped over all splits.
    pub num_skipped: u64,
    /// Where the report is.
    pub report_path: PathBuf,
    /// Notes from scanning the input.
    pub notes: Vec<String>,
}

/// One split of [`RunSummary`].
#[derive(Clone, Debug)]
pub struct SplitSummary {
    /// Split name.
    pub name: String,
    /// Counts over the whole split.
    pub counts: Counts,
    /// Shards in the split.
    pub num_shards: usize,
    /// Shards found finished from an earlier run.
    pub num_shards_reused: usize,
    /// Files processed in this run.
    pub files_this_run: u64,
    /// Source bytes read in this run.
    pub bytes_this_run: u64,
    /// Wall time of this run's work on the split.
    pub seconds: f64,
}

struct SplitPlan {
    name: String,
    samples: Vec<SourceSample>,
    shards: Vec<Range<usize>>,
    digests: Vec<String>,
}

/// Tar bytes a sample takes: two headers, padded data, a padded label.
fn tar_cost(size: u64) -> u64 {
    512 + size.div_ceil(512) * 512 + 512 + 512
}

fn plan_split(
    name: &str,
    mut samples: Vec<SourceSample>,
    opts: &ShardOptions,
    classes_digest: &str,
) -> SplitPlan {
    if let Some(seed) = opts.shuffle_seed {
        let stream = if name == "train" { 0 } else { 1 };
        Rng::for_item(seed, &[stream]).shuffle(&mut samples);
    }
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 1024u64);
    for (i, s) in samples.iter().enumerate() {
        let cost = tar_cost(s.size);
        if i > start && bytes + cost > opts.shard_bytes {
            shards.push(start..i);
            start = i;
            bytes = 1024;
        }
        bytes += cost;
    }
    if start < samples.len() {
        shards.push(start..samples.len());
    }
    let digests = shards
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let mut h = Sha256::new();
            h.update(format!(
                "v1 {classes_digest} {name} {k} max_side={:?} quality={}\n",
                opts.max_side, opts.quality
            ));
            for s in &samples[r.clone()] {
                h.update(format!(
                    "{} {} {} {} {}\n",
                    s.rel, s.key, s.label, s.size, s.mtime_ns
                ));
            }
            hex_digest(h)
        })
        .collect();
    SplitPlan {
        name: name.into(),
        samples,
        shards,
        digests,
    }
}

fn hex_digest(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Names of shard `k` of split `split`: tar path relative to DST, and state file name.
fn shard_names(split: &str, k: usize) -> (String, String) {
    (
        format!("{split}/{split}-{k:06}.tar"),
        format!("{split}-{k:06}.json"),
    )
}

/// The outcome of processing one input file.
enum Outcome {
    Stored,
    Converted(String),
    Resized,
    Skipped(String),
}

struct Processed {
    bytes: Vec<u8>,
    outcome: Outcome,
    grayscale: bool,
    progressive: bool,
}

fn reencode(bytes: &[u8], max_side: Option<u32>, quality: u8) -> Result<Vec<u8>, String> {
    let mut img = convert::decode(bytes)?;
    if let Some(m) = max_side {
        let (w, h) = convert::fit_size(img.width, img.height, m);
        if (w, h) != (img.width, img.height) {
            img = convert::resize(&img, w, h)?;
        }
    }
    convert::encode_jpeg(&img, quality)
}

/// Reads and classifies one file; decodes only CMYK JPEGs, PNGs and (with `--max-side`) large
/// images.
fn process(sample: &SourceSample, opts: &ShardOptions) -> Processed {
    let skipped = |why: String| Processed {
        bytes: Vec::new(),
        outcome: Outcome::Skipped(why),
        grayscale: false,
        progressive: false,
    };
    let bytes = match std::fs::read(&sample.path) {
        Ok(b) => b,
        Err(e) => return skipped(format!("cannot read: {e}")),
    };
    let q = opts.quality;
    match sniff(&bytes) {
        Err(why) => skipped(why),
        Ok(Kind::Png) => match reencode(&bytes, opts.max_side, q) {
            Ok(out) => Processed {
                bytes: out,
                outcome: Outcome::Converted(format!("PNG file converted to JPEG (quality {q})")),
                grayscale: false,
                progressive: false,
            },
            Err(e) => skipped(format!("PNG file: {e}")),
        },
        Ok(Kind::Jpeg(info)) if info.components == 4 => {
            let what = if info.adobe_transform == Some(2) {
                "YCCK"
            } else {
                "CMYK"
            };
            match reencode(&bytes, opts.max_side, q) {
                Ok(out) => Processed {
                    bytes: out,
                    outcome: Outcome::Converted(format!(
                        "{what} JPEG converted to RGB JPEG (quality {q})"
                    )),
                    grayscale: false,
                    progressive: false,
                },
                Err(e) => skipped(format!("{what} JPEG: {e}")),
            }
        }
        Ok(Kind::Jpeg(info)) => {
            let too_big = opts
                .max_side
                .is_some_and(|m| info.width.max(info.height) > m);
            if too_big {
                match reencode(&bytes, opts.max_side, q) {
                    Ok(out) => Processed {
                        bytes: out,
                        outcome: Outcome::Resized,
                        grayscale: info.components == 1,
                        progressive: false,
                    },
                    Err(e) => skipped(e),
                }
            } else {
                Processed {
                    bytes,
                    outcome: Outcome::Stored,
                    grayscale: info.components == 1,
                    progressive: info.progressive,
                }
            }
        }
    }
}

/// Whether shard `k`'s files and state show it finished by an earlier run with the same plan.
fn finished_shard(dst: &Path, state_path: &Path, digest: &str) -> Option<ShardState> {
    let state: ShardState = serde_json::from_slice(&std::fs::read(state_path).ok()?).ok()?;
    let size = |p: &str| std::fs::metadata(dst.join(p)).ok().map(|m| m.len());
    (state.plan_digest == digest
        && size(&state.shard.tar) == Some(state.shard.tar_bytes)
        && size(&state.shard.index) == Some(state.shard.index_bytes))
    .then_some(state)
}

/// Runs `shard-imagenet SRC DST`.
pub fn run(src: &Path, dst: &Path, opts: &ShardOptions) -> Result<RunSummary> {
    if opts.shard_bytes < 4096 {
        bail!(
            "--shard-bytes {} is too small (at least 4096)",
            opts.shard_bytes
        );
    }
    if !(1..=100).contains(&opts.quality) {
        bail!("--quality {} is outside 1..=100", opts.quality);
    }
    let source = scan(src, &opts.scan)?;
    let Source {
        classes,
        splits: source_splits,
        notes,
    } = source;
    let classes_digest = {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&classes).expect("classes serialise"));
        hex_digest(h)
    };
    let mut unusable: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let plans: Vec<SplitPlan> = source_splits
        .into_iter()
        .map(|s| {
            unusable.insert(s.name.clone(), s.unusable);
            plan_split(&s.name, s.samples, opts, &classes_digest)
        })
        .collect();
    let plan_digest = {
        let mut h = Sha256::new();
        for p in &plans {
            h.update(format!("{} {}\n", p.name, p.digests.join(" ")));
        }
        hex_digest(h)
    };

    let manifest_path = dst.join(shards::MANIFEST_FILE);
    let report_path = dst.join(REPORT_FILE);
    if manifest_path.exists() {
        return already_done(&manifest_path, &report_path, &plan_digest, notes);
    }

    let state_dir = dst.join(STATE_DIR);
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    for p in &plans {
        let dir = dst.join(&p.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_tmp_files(&dir)?;
    }

    // Finished shards from an earlier run, and the work left.
    let mut states: Vec<Vec<Option<ShardState>>> = Vec::new();
    let mut pending: Vec<(usize, usize)> = Vec::new();
    for (si, p) in plans.iter().enumerate() {
        let mut row = Vec::new();
        for k in 0..p.shards.len() {
            let (_, state_name) = shard_names(&p.name, k);
            let done = finished_shard(dst, &state_dir.join(&state_name), &p.digests[k]);
            if done.is_none() {
                pending.push((si, k));
            }
            row.push(done);
        }
        states.push(row);
    }

    let mut seconds = vec![0.0; plans.len()];
    let mut files_run = vec![0u64; plans.len()];
    let mut bytes_run = vec![0u64; plans.len()];
    if !pending.is_empty() {
        let written = write_shards(dst, &state_dir, &plans, &pending, opts)?;
        // Shards are written side by side: a split's time runs from its first shard's start to
        // its last shard's end.
        let mut spans: Vec<Option<(Instant, Instant)>> = vec![None; plans.len()];
        for (si, k, state, (start, end), files, bytes) in written {
            states[si][k] = Some(state);
            let span = spans[si].get_or_insert((start, end));
            *span = (span.0.min(start), span.1.max(end));
            files_run[si] += files;
            bytes_run[si] += bytes;
        }
        for (si, span) in spans.iter().enumerate() {
            if let Some((a, b)) = span {
                seconds[si] = (*b - *a).as_secs_f64();
            }
        }
    }

    // Assemble the report and, if allowed, the manifest.
    let mut manifest = Manifest::new(
        concat!("shard-imagenet ", env!("CARGO_PKG_VERSION")),
        classes,
    );
    let mut report = Report::default();
    let mut summaries = Vec::new();
    for (si, p) in plans.iter().enumerate() {
        let mut sr = SplitReport::default();
        let mut info = SplitInfo {
            num_samples: 0,
            shards: Vec::new(),
        };
        for state in &states[si] {
            let state = state.as_ref().expect("every shard finished");
            sr.counts.add(&state.counts);
            sr.converted.extend(state.converted.iter().cloned());
            sr.skipped.extend(state.skipped.iter().cloned());
            info.num_samples += state.shard.num_samples;
            info.shards.push(state.shard.clone());
        }
        for (file, why) in unusable.remove(&p.name).unwrap_or_default() {
            sr.counts.skipped += 1;
            sr.skipped.push(ReportEntry {
                key: shards::key::key_from_file_name(
                    Path::new(&file)
                        .file_name()
                        .map_or("", |n| n.to_str().unwrap_or("")),
                ),
                file,
                what: why,
                source_bytes: 0,
                stored_bytes: None,
            });
        }
        summaries.push(SplitSummary {
            name: p.name.clone(),
            counts: sr.counts.clone(),
            num_shards: p.shards.len(),
            num_shards_reused: p.shards.len() - pending.iter().filter(|(s, _)| *s == si).count(),
            files_this_run: files_run[si],
            bytes_this_run: bytes_run[si],
            seconds: seconds[si],
        });
        manifest.splits.insert(p.name.clone(), info);
        report.splits.insert(p.name.clone(), sr);
    }
    let num_skipped: u64 = summaries.iter().map(|s| s.counts.skipped).sum();
    let mut report_text = serde_json::to_vec_pretty(&report)?;
    report_text.push(b'\n');
    shards::manifest::write_atomically(&report_path, &report_text)?;

    let manifest_written = num_skipped == 0 || opts.allow_skips;
    if manifest_written {
        let build = &mut manifest.build;
        build.insert("plan_digest".into(), plan_digest.into());
        build.insert("shard_bytes".into(), opts.shard_bytes.into());
        build.insert("shuffle_seed".into(), opts.shuffle_seed.into());
        build.insert("max_side".into(), opts.max_side.into());
        build.insert("quality".into(), opts.quality.into());
        build.insert("num_skipped".into(), num_skipped.into());
        manifest.save(&manifest_path)?;
        std::fs::remove_dir_all(&state_dir)
            .with_context(|| format!("removing {}", state_dir.display()))?;
    }
    Ok(RunSummary {
        splits: summaries,
        already_complete: false,
        manifest_written,
        num_skipped,
        report_path,
        notes,
    })
}

fn already_done(
    manifest_path: &Path,
    report_path: &Path,
    plan_digest: &str,
    notes: Vec<String>,
) -> Result<RunSummary> {
    let manifest = Manifest::load(manifest_path)?;
    let previous = manifest.build.get("plan_digest").and_then(|v| v.as_str());
    if previous != Some(plan_digest) {
        bail!(
            "{} already holds a finished shard set built from other input or options: choose an empty destination or delete it",
            manifest_path.parent().unwrap_or(Path::new(".")).display()
        );
    }
    let report: Report = serde_json::from_slice(
        &std::fs::read(report_path)
            .with_context(|| format!("reading {}", report_path.display()))?,
    )
    .with_context(|| format!("parsing {}", report_path.display()))?;
    let splits = manifest
        .splits
        .iter()
        .map(|(name, info)| SplitSummary {
            name: name.clone(),
            counts: report
                .splits
                .get(name)
                .map(|r| r.counts.clone())
                .unwrap_or_default(),
            num_shards: info.shards.len(),
            num_shards_reused: info.shards.len(),
            files_this_run: 0,
            bytes_this_run: 0,
            seconds: 0.0,
        })
        .collect::<Vec<_>>();
    Ok(RunSummary {
        num_skipped: splits.iter().map(|s| s.counts.skipped).sum(),
        splits,
        already_complete: true,
        manifest_written: true,
        report_path: report_path.to_owned(),
        notes,
    })
}

fn remove_tmp_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "tmp") {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
    }
    Ok(())
}

struct Job {
    seq: usize,
    /// Index into `pending`: which shard the chunk belongs to.
    shard: usize,
    range: Range<usize>,
    /// The shard's last chunk.
    last: bool,
}

type Written = (usize, usize, ShardState, (Instant, Instant), u64, u64);

/// A chunk on its way to its shard's writer: the sample range in the split plan and its results.
type Chunk = (Range<usize>, Vec<Processed>);

/// The order chunks are processed in: round-robin over up to `open` shards at a time, each
/// shard's chunks in order, so that `open` shard writers (and their hashing threads) work side
/// by side. The output does not depend on it: each shard's bytes are fixed by the plan.
fn interleave(plans: &[SplitPlan], pending: &[(usize, usize)], open: usize) -> Vec<Job> {
    let chunks = |n: usize| {
        let (si, k) = pending[n];
        let r = plans[si].shards[k].clone();
        (r.start..r.end)
            .step_by(CHUNK)
            .map(move |start| start..(start + CHUNK).min(r.end))
            .collect::<std::collections::VecDeque<_>>()
    };
    let mut active: Vec<(usize, std::collections::VecDeque<Range<usize>>)> = (0..open
        .min(pending.len()))
        .map(|n| (n, chunks(n)))
        .collect();
    let mut next = active.len();
    let mut jobs = Vec::new();
    while !active.is_empty() {
        let mut i = 0;
        while i < active.len() {
            let (n, queue) = &mut active[i];
            let range = queue.pop_front().expect("active shards have chunks left");
            jobs.push(Job {
                seq: jobs.len(),
                shard: *n,
                range,
                last: queue.is_empty(),
            });
            if queue.is_empty() {
                if next < pending.len() {
                    active[i] = (next, chunks(next));
                    next += 1;
                } else {
                    active.remove(i);
                    continue;
                }
            }
            i += 1;
        }
    }
    jobs
}

/// Processes the pending shards on `opts.threads` workers and writes up to `opts.threads`
/// shards at a time, each on its own writer thread.
fn write_shards(
    dst: &Path,
    state_dir: &Path,
    plans: &[SplitPlan],
    pending: &[(usize, usize)],
    opts: &ShardOptions,
) -> Result<Vec<Written>> {
    let abort_after: Option<u64> = std::env::var(ABORT_ENV).ok().and_then(|v| v.parse().ok());
    let written_total = AtomicU64::new(0);
    let threads = opts.threads.max(1);
    let jobs = interleave(plans, pending, threads);
    let total_files: u64 = jobs.iter().map(|j| j.range.len() as u64).sum();
    let job_meta: Vec<(usize, Range<usize>, bool)> = jobs
        .iter()
        .map(|j| (j.shard, j.range.clone(), j.last))
        .collect();
    let window = 4 * threads;
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(threads);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(usize, Vec<Processed>)>();
    let (credit_tx, credit_rx) = crossbeam_channel::bounded::<()>(window);
    for _ in 0..window {
        credit_tx.send(()).expect("room for the initial credits");
    }

    std::thread::scope(|scope| {
        scope.spawn(move || {
            for job in jobs {
                if credit_rx.recv().is_err() || job_tx.send(job).is_err() {
                    return;
                }
            }
        });
        for i in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn_scoped(scope, move || {
                    for job in job_rx {
                        let split = pending[job.shard].0;
                        let out = plans[split].samples[job.range]
                            .iter()
                            .map(|s| process(s, opts))
                            .collect();
                        if done_tx.send((job.seq, out)).is_err() {
                            return;
                        }
                    }
                })
                .expect("spawning a worker thread");
        }
        drop(done_tx);
        drop(job_rx);

        // This thread takes chunks in processing order and hands each to its shard's writer.
        let mut progress = Progress::new("shard-imagenet", total_files, opts.quiet);
        let mut early: BTreeMap<usize, Vec<Processed>> = BTreeMap::new();
        let mut senders: HashMap<usize, crossbeam_channel::Sender<Chunk>> = HashMap::new();
        let mut writers = Vec::new();
        let route = (|| -> Result<()> {
            for (seq, (n, range, last)) in job_meta.iter().enumerate() {
                let chunk = loop {
                    if let Some(c) = early.remove(&seq) {
                        break c;
                    }
                    let (s, c) = done_rx
                        .recv()
                        .map_err(|_| anyhow!("worker threads stopped early"))?;
                    early.insert(s, c);
                };
                let _ = credit_tx.send(());
                let (si, k) = pending[*n];
                let bytes: u64 = plans[si].samples[range.clone()]
                    .iter()
                    .map(|s| s.size)
                    .sum();
                progress.add(range.len() as u64, bytes);
                let tx = senders.entry(*n).or_insert_with(|| {
                    let (tx, rx) = crossbeam_channel::bounded(4);
                    let written_total = &written_total;
                    writers.push(
                        std::thread::Builder::new()
                            .name(format!("shard-writer-{n}"))
                            .spawn_scoped(scope, move || {
                                write_one_shard(
                                    dst,
                                    state_dir,
                                    &plans[si],
                                    (si, k),
                                    rx,
                                    written_total,
                                    abort_after,
                                )
                            })
                            .expect("spawning a writer thread"),
                    );
                    tx
                });
                if tx.send((range.clone(), chunk)).is_err() {
                    // The writer stopped: its error is reported when it is joined.
                    break;
                }
                if *last {
                    senders.remove(n);
                }
            }
            Ok(())
        })();
        progress.finish();
        // On error, dropping the receiver and the credits stops the workers and the dispatcher;
        // dropping the senders lets the writers end.
        drop(done_rx);
        drop(credit_tx);
        drop(senders);
        let mut out = Vec::new();
        for w in writers {
            out.push(w.join().expect("writer thread panicked")?);
        }
        route?;
        out.sort_by_key(|w| (w.0, w.1));
        Ok(out)
    })
}

/// Writes shard `(si, k)` from its chunks, in order, and records its state file.
fn write_one_shard(
    dst: &Path,
    state_dir: &Path,
    plan: &SplitPlan,
    (si, k): (usize, usize),
    chunks: crossbeam_channel::Receiver<Chunk>,
    written_total: &AtomicU64,
    abort_after: Option<u64>,
) -> Result<Written> {
    let started = Instant::now();
    let (tar_rel, state_name) = shard_names(&plan.name, k);
    let mut writer = ShardWriter::create(&dst.join(&tar_rel))?;
    let mut counts = Counts::default();
    let mut converted = Vec::new();
    let mut skipped = Vec::new();
    let mut next = plan.shards[k].start;
    for (range, chunk) in chunks {
        assert_eq!(range.start, next, "chunks of a shard arrive in order");
        next = range.end;
        for (s, p) in plan.samples[range].iter().zip(chunk) {
            counts.source_bytes += s.size;
            let entry = |what: String, stored: Option<u64>| ReportEntry {
                file: s.rel.clone(),
                key: s.key.clone(),
                what,
                source_bytes: s.size,
                stored_bytes: stored,
            };
            match p.outcome {
                Outcome::Skipped(why) => {
                    counts.skipped += 1;
                    skipped.push(entry(why, None));
                    continue;
                }
                Outcome::Stored => counts.stored += 1,
                Outcome::Resized => counts.resized += 1,
                Outcome::Converted(what) => {
                    counts.converted += 1;
                    converted.push(entry(what, Some(p.bytes.len() as u64)));
                }
            }
            counts.grayscale += p.grayscale as u64;
            counts.progressive += p.progressive as u64;
            counts.samples += 1;
            counts.stored_bytes += p.bytes.len() as u64;
            writer
                .append_owned(&s.key, p.bytes, s.label)
                .with_context(|| format!("writing {}", s.rel))?;
            let total = written_total.fetch_add(1, Ordering::Relaxed) + 1;
            if abort_after == Some(total) {
                std::process::abort();
            }
        }
    }
    if next != plan.shards[k].end {
        bail!("shard {tar_rel}: input stopped before the shard was complete");
    }
    let w = writer.finish()?;
    let rel = |p: &Path| {
        p.strip_prefix(dst)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let state = ShardState {
        plan_digest: plan.digests[k].clone(),
        shard: ShardInfo {
            tar: rel(&w.tar_path),
            index: rel(&w.index_path),
            num_samples: w.num_samples,
            tar_bytes: w.tar_bytes,
            tar_sha256: w.tar_sha256,
            index_bytes: w.index_bytes,
            index_sha256: w.index_sha256,
        },
        counts: counts.clone(),
        converted,
        skipped,
    };
    shards::manifest::write_atomically(&state_dir.join(&state_name), &serde_json::to_vec(&state)?)?;
    Ok((
        si,
        k,
        state,
        (started, Instant::now()),
        plan.shards[k].len() as u64,
        counts.source_bytes,
    ))
}
