//! The pipeline: a fixed pool of worker threads that fill pooled batch buffers, delivered to
//! the consumer in order.
//!
//! Channels (crossbeam, no `Mutex` anywhere): `jobs` (a batch's planned samples plus a free
//! buffer) to the workers, `done` (filled buffers) back to the consumer, and `free` (buffers
//! returned when a [`Batch`] is dropped). The number of buffers is the only backpressure and
//! bounds memory: workers + prefetch buffers of `batch_size x size x size x 3` bytes, whatever
//! the data set size (shards are memory-mapped). The consumer dispatches jobs itself as buffers
//! come free, reorders finished batches by id, and stops cleanly when dropped mid-epoch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use serde::{Deserialize, Serialize};
use shards::Split;

use crate::batch::{Batch, HostStorage, SkippedSample};
use crate::decode::{DecodeOptions, DecoderKind};
use crate::plan::{EpochPlan, PlanConfig, PlannedSample};
use crate::sample::{Augment, SampleProcessor, Transform};
use crate::Error;

/// What to do with a sample that cannot be read or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorrupt {
    /// Stop the epoch with an error naming the sample.
    Fail,
    /// Leave it out of its batch (which is then shorter) and count it.
    Skip,
}

/// Loader settings.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// The per-sample transform.
    pub transform: Transform,
    /// The epoch plan. Its `num_samples` may limit the loader to the first samples of the split;
    /// 0 (or more than the split holds) means the whole split.
    pub plan: PlanConfig,
    /// Worker threads.
    pub num_workers: usize,
    /// Batches buffered beyond the ones being filled.
    pub prefetch: usize,
    /// JPEG decoder.
    pub decoder: DecoderKind,
    /// Decoding shortcuts.
    pub decode: DecodeOptions,
    /// Corrupt-sample policy.
    pub on_corrupt: OnCorrupt,
}

impl LoaderConfig {
    /// Defaults: all cores, prefetch 2, fastest decoder, fail on corrupt samples; decoding
    /// shortcuts on for training, region decoding only for evaluation (DCT scaling would move
    /// eval outputs away from timm's, and eval crops are too large for regions to pay anyway).
    pub fn new(transform: Transform, plan: PlanConfig) -> Self {
        let decode = match transform {
            Transform::Train { .. } => DecodeOptions::default(),
            Transform::Eval { .. } => DecodeOptions {
                dct_scaling: false,
                region: true,
            },
        };
        LoaderConfig {
            transform,
            plan,
            num_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 2,
            decoder: DecoderKind::fastest(),
            decode,
            on_corrupt: OnCorrupt::Fail,
        }
    }

    /// Buffers the pool needs.
    pub fn num_buffers(&self) -> usize {
        self.num_workers.max(1) + self.prefetch
    }

    /// Bytes one batch buffer needs.
    pub fn buffer_bytes(&self) -> usize {
        self.plan.batch_size * (self.transform.size() as usize).pow(2) * 3
    }
}

/// Where a loader stands at a batch boundary: enough to resume the epoch exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch.
    pub epoch: u64,
    /// The next batch to deliver.
    pub next_batch: usize,
}

/// Counts of an epoch so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochSummary {
    /// Batches delivered.
    pub batches: usize,
    /// Samples delivered.
    pub samples: u64,
    /// Samples skipped as corrupt.
    pub skipped: u64,
}

struct Job<S> {
    epoch: u64,
    batch_id: usize,
    samples: Vec<PlannedSample>,
    storage: S,
}

struct Done<S> {
    epoch: u64,
    batch_id: usize,
    storage: S,
    labels: Vec<u32>,
    indices: Vec<u32>,
    skipped: Vec<SkippedSample>,
    error: Option<Error>,
}

/// Stage times in nanoseconds, summed over workers (atomics, updated once per batch).
#[derive(Default)]
struct Stats {
    read_ns: AtomicU64,
    decode_ns: AtomicU64,
    resize_ns: AtomicU64,
    augment_ns: AtomicU64,
    collate_ns: AtomicU64,
}

/// Per-stage seconds summed over all workers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageSeconds {
    /// Touching the sample's bytes in the memory-mapped shard (page-ins).
    pub read_s: f64,
    /// Header parsing and decoding.
    pub decode_s: f64,
    /// Crop, resize and flip (into the batch slot: there is no separate copy).
    pub resize_s: f64,
    /// The augmentation hook.
    pub augment_s: f64,
    /// Per-batch bookkeeping: sample lookup, labels, indices.
    pub collate_s: f64,
}

/// The loader: a split, a configuration, a worker pool and a buffer pool.
pub struct Loader<S: HostStorage = Vec<u8>> {
    cfg: LoaderConfig,
    job_tx: Option<Sender<Job<S>>>,
    done_rx: Receiver<Done<S>>,
    free_tx: Sender<S>,
    free_rx: Receiver<S>,
    workers: Vec<std::thread::JoinHandle<()>>,
    stats: Arc<Stats>,
    num_buffers: usize,
}

impl Loader<Vec<u8>> {
    /// A loader over `split` with heap buffers.
    pub fn new(split: Arc<Split>, cfg: LoaderConfig) -> Result<Self, Error> {
        Self::new_with(split, cfg, None)
    }

    /// Same, with an augmentation after the flip (RandAugment).
    pub fn new_with(
        split: Arc<Split>,
        cfg: LoaderConfig,
        augment: Option<Arc<dyn Augment>>,
    ) -> Result<Self, Error> {
        let buffers = (0..cfg.num_buffers())
            .map(|_| vec![0u8; cfg.buffer_bytes()])
            .collect();
        Loader::with_buffers(split, cfg, buffers, augment)
    }
}

impl<S: HostStorage> Loader<S> {
    /// A loader whose batches live in `buffers` (each at least [`LoaderConfig::buffer_bytes`]).
    pub fn with_buffers(
        split: Arc<Split>,
        mut cfg: LoaderConfig,
        buffers: Vec<S>,
        augment: Option<Arc<dyn Augment>>,
    ) -> Result<Self, Error> {
        if cfg.plan.num_samples == 0 || cfg.plan.num_samples > split.len() {
            cfg.plan.num_samples = split.len();
        }
        cfg.plan.validate().map_err(Error::Config)?;
        if buffers.is_empty() {
            return Err(Error::Config("the buffer pool is empty".into()));
        }
        for (i, b) in buffers.iter().enumerate() {
            if b.bytes().len() < cfg.buffer_bytes() {
                return Err(Error::Config(format!(
                    "batch buffer {i} holds {} bytes, a batch of {} at {}px needs {}",
                    b.bytes().len(),
                    cfg.plan.batch_size,
                    cfg.transform.size(),
                    cfg.buffer_bytes()
                )));
            }
        }
        let num_buffers = buffers.len();
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job<S>>(num_buffers);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Done<S>>(num_buffers);
        let (free_tx, free_rx) = crossbeam_channel::bounded::<S>(num_buffers);
        for b in buffers {
            free_tx.send(b).expect("room for every buffer");
        }
        let stats = Arc::new(Stats::default());
        let mut workers = Vec::new();
        for i in 0..cfg.num_workers.max(1) {
            let mut proc = SampleProcessor::new(
                cfg.transform.clone(),
                cfg.decoder,
                cfg.decode,
                augment.clone(),
            )
            .map_err(Error::Config)?;
            let (job_rx, done_tx) = (job_rx.clone(), done_tx.clone());
            let (split, stats) = (split.clone(), stats.clone());
            let (seed, size, policy) = (cfg.plan.seed, cfg.transform.size(), cfg.on_corrupt);
            let handle = std::thread::Builder::new()
                .name(format!("loader-{i}"))
                .spawn(move || {
                    for job in job_rx {
                        let done = fill(&split, &mut proc, job, seed, size, policy, &stats);
                        if done_tx.send(done).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Config(format!("cannot spawn a loader thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Loader {
            cfg,
            job_tx: Some(job_tx),
            done_rx,
            free_tx,
            free_rx,
            workers,
            stats,
            num_buffers,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The plan of `epoch` for this rank.
    pub fn plan(&self, epoch: u64) -> Result<EpochPlan, Error> {
        EpochPlan::new(&self.cfg.plan, epoch).map_err(Error::Config)
    }

    /// Runs `epoch` from its first batch.
    pub fn epoch(&mut self, epoch: u64) -> Result<EpochRun<'_, S>, Error> {
        self.resume(LoaderState {
            epoch,
            next_batch: 0,
        })
    }

    /// Runs an epoch from `state.next_batch`: the batches are the ones an uninterrupted run
    /// would have delivered from there, byte for byte.
    pub fn resume(&mut self, state: LoaderState) -> Result<EpochRun<'_, S>, Error> {
        let plan = self.plan(state.epoch)?;
        if state.next_batch > plan.num_batches() {
            return Err(Error::Config(format!(
                "cannot resume at batch {} of epoch {}: it has {} batches",
                state.next_batch,
                state.epoch,
                plan.num_batches()
            )));
        }
        Ok(EpochRun {
            next_dispatch: state.next_batch,
            next_deliver: state.next_batch,
            plan,
            loader: self,
            ready: BTreeMap::new(),
            in_flight: 0,
            summary: EpochSummary::default(),
            failed: false,
        })
    }

    /// Seconds per stage over all workers since the loader was made.
    pub fn stage_seconds(&self) -> StageSeconds {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        StageSeconds {
            read_s: s(&self.stats.read_ns),
            decode_s: s(&self.stats.decode_ns),
            resize_s: s(&self.stats.resize_ns),
            augment_s: s(&self.stats.augment_ns),
            collate_s: s(&self.stats.collate_ns),
        }
    }
}

impl<S: HostStorage> Drop for Loader<S> {
    fn drop(&mut self) {
        drop(self.job_tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Touches one byte per page so the page-in cost is measured as reading, not decoding.
fn touch(bytes: &[u8]) -> u8 {
    bytes.iter().step_by(4096).fold(0u8, |a, &b| a ^ b)
}

fn fill<S: HostStorage>(
    split: &Split,
    proc: &mut SampleProcessor,
    mut job: Job<S>,
    seed: u64,
    size: u32,
    policy: OnCorrupt,
    stats: &Stats,
) -> Done<S> {
    let slot = (size as usize).pow(2) * 3;
    let mut labels = Vec::with_capacity(job.samples.len());
    let mut indices = Vec::with_capacity(job.samples.len());
    let mut skipped = Vec::new();
    let mut error = None;
    let before = proc.times;
    let (mut read_ns, mut collate_ns) = (0u64, 0u64);
    let out = job.storage.bytes_mut();
    for ps in &job.samples {
        let t0 = Instant::now();
        let result = split
            .get(ps.index as u64)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let t1 = Instant::now();
                std::hint::black_box(touch(s.jpeg));
                read_ns += t1.elapsed().as_nanos() as u64;
                collate_ns += (t1 - t0).as_nanos() as u64;
                let k = labels.len();
                proc.process(
                    s.jpeg,
                    seed,
                    job.epoch,
                    ps.position,
                    &mut out[k * slot..(k + 1) * slot],
                )
                .map(|()| s.label)
                .map_err(|reason| {
                    format!(
                        "{}: sample {:?} at byte offset {}: {reason}",
                        s.shard.display(),
                        s.key,
                        s.offset
                    )
                })
            });
        match result {
            Ok(label) => {
                labels.push(label);
                indices.push(ps.index);
            }
            Err(e) if policy == OnCorrupt::Skip => skipped.push(SkippedSample {
                index: ps.index,
                error: e,
            }),
            Err(e) => {
                error = Some(Error::Sample {
                    index: ps.index,
                    batch_id: job.batch_id,
                    epoch: job.epoch,
                    reason: e,
                });
                break;
            }
        }
    }
    let mut d = proc.times;
    d.decode_s -= before.decode_s;
    d.resize_s -= before.resize_s;
    d.augment_s -= before.augment_s;
    let ns = |s: f64| (s * 1e9) as u64;
    stats.read_ns.fetch_add(read_ns, Ordering::Relaxed);
    stats.collate_ns.fetch_add(collate_ns, Ordering::Relaxed);
    stats.decode_ns.fetch_add(ns(d.decode_s), Ordering::Relaxed);
    stats.resize_ns.fetch_add(ns(d.resize_s), Ordering::Relaxed);
    stats
        .augment_ns
        .fetch_add(ns(d.augment_s), Ordering::Relaxed);
    Done {
        epoch: job.epoch,
        batch_id: job.batch_id,
        storage: job.storage,
        labels,
        indices,
        skipped,
        error,
    }
}

/// One epoch in progress: an iterator of batches in order. Dropping it mid-epoch waits for
/// the batches being filled and returns every buffer to the pool.
pub struct EpochRun<'a, S: HostStorage> {
    loader: &'a mut Loader<S>,
    plan: EpochPlan,
    next_dispatch: usize,
    next_deliver: usize,
    ready: BTreeMap<usize, Done<S>>,
    in_flight: usize,
    summary: EpochSummary,
    failed: bool,
}

/// How long the consumer waits for a buffer to come back before reporting that it holds them all.
const BUFFER_WAIT: Duration = Duration::from_secs(120);

impl<S: HostStorage> EpochRun<'_, S> {
    /// Where the run stands: resuming from this state delivers the remaining batches.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            epoch: self.plan.epoch(),
            next_batch: self.next_deliver,
        }
    }

    /// Counts so far.
    pub fn summary(&self) -> EpochSummary {
        self.summary
    }

    /// The epoch's plan.
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    fn dispatch(&mut self, storage: S) {
        let b = self.next_dispatch;
        self.next_dispatch += 1;
        self.in_flight += 1;
        let job = Job {
            epoch: self.plan.epoch(),
            batch_id: b,
            samples: self.plan.batch(b).to_vec(),
            storage,
        };
        self.loader
            .job_tx
            .as_ref()
            .expect("workers running")
            .send(job)
            .expect("workers alive while the loader exists");
    }

    fn accept(&mut self, d: Done<S>) {
        debug_assert_eq!(d.epoch, self.plan.epoch());
        self.in_flight -= 1;
        self.ready.insert(d.batch_id, d);
    }
}

impl<S: HostStorage> Iterator for EpochRun<'_, S> {
    type Item = Result<Batch<S>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.plan.num_batches();
        loop {
            if self.failed || self.next_deliver >= end {
                return None;
            }
            if let Some(d) = self.ready.remove(&self.next_deliver) {
                self.next_deliver += 1;
                if let Some(e) = d.error {
                    self.failed = true;
                    let _ = self.loader.free_tx.send(d.storage);
                    return Some(Err(e));
                }
                self.summary.batches += 1;
                self.summary.samples += d.labels.len() as u64;
                self.summary.skipped += d.skipped.len() as u64;
                return Some(Ok(Batch {
                    epoch: d.epoch,
                    batch_id: d.batch_id,
                    len: d.labels.len(),
                    size: self.loader.cfg.transform.size(),
                    labels: d.labels,
                    indices: d.indices,
                    skipped: d.skipped,
                    storage: Some(d.storage),
                    home: self.loader.free_tx.clone(),
                }));
            }
            // Hand out every free buffer.
            while self.next_dispatch < end {
                match self.loader.free_rx.try_recv() {
                    Ok(s) => self.dispatch(s),
                    Err(_) => break,
                }
            }
            let done_rx = self.loader.done_rx.clone();
            let free_rx = self.loader.free_rx.clone();
            if self.next_dispatch >= end {
                // Everything is dispatched and the next batch is not back yet: wait for it.
                debug_assert!(self.in_flight > 0, "an undelivered batch is in flight");
                let d = done_rx.recv().expect("workers alive while in flight");
                self.accept(d);
                continue;
            }
            if self.in_flight == 0 {
                // Nothing is being filled: the consumer holds every buffer.
                match free_rx.recv_timeout(BUFFER_WAIT) {
                    Ok(s) => self.dispatch(s),
                    Err(_) => {
                        self.failed = true;
                        return Some(Err(Error::Config(format!(
                            "all {} batch buffers are held by the consumer: drop batches when done with them",
                            self.loader.num_buffers
                        ))));
                    }
                }
                continue;
            }
            select! {
                recv(done_rx) -> d => self.accept(d.expect("workers alive while in flight")),
                recv(free_rx) -> s => self.dispatch(s.expect("pool sender alive")),
            }
        }
    }
}

impl<S: HostStorage> Drop for EpochRun<'_, S> {
    fn drop(&mut self) {
        while self.in_flight > 0 {
            match self.loader.done_rx.recv() {
                Ok(d) => {
                    self.in_flight -= 1;
                    let _ = self.loader.free_tx.send(d.storage);
                }
                Err(_) => break,
            }
        }
        for (_, d) in std::mem::take(&mut self.ready) {
            let _ = self.loader.free_tx.send(d.storage);
        }
    }
}
