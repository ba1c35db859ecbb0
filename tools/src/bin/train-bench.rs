//! `train-bench`: images/s of the full training step on GPU-resident synthetic data.
//!
//! ```text
//! train-bench --model resnet50 --batch-size 256 --size 224 --steps N --device cuda:0
//!             [--warmup W] [--layout auto|nchw|nhwc] [--dtype auto|bf16|f32]
//!             [--backward auto|graph|explicit] [--deterministic] [--breakdown]
//!             [--nproc-per-node N] [--eval]
//! ```
//!
//! One step is what `train` does per update: forward (BatchNorm on batch statistics, stochastic
//! depth of the A1 recipe), BCE with the A1 target threshold on dense smoothed one-hot targets,
//! backward, LAMB with the A1 settings (global-norm clip, weight-decay groups). The images are
//! random u8 pixels normalised once and kept on the device, so the loader is not measured (see
//! `loader-bench` and the end-to-end script for that). The default is the fast path:
//! channels-last activations (bf16 on CUDA with f32 master weights, f32 on the CPU through
//! `trainer::ops::cpu`); `--layout nchw` (with `--dtype f32` on CUDA) measures candle's own ops.
//! `--backward graph` measures candle's autograd over the whole network in place of the explicit
//! trunk backward that the fast path uses by default (see `trainer::model::BackwardMode`); the
//! line's `backward` says which ran.
//!
//! `--eval` times the evaluation forward instead (BatchNorm on running statistics, no gradients,
//! as `train`'s validation, with its per-pass cache of folded filters on the CPU; the line's
//! `mode` says which).
//!
//! Prints one JSON line: `images_per_s`, `ms_per_step`, `cpu_busy_cores` (CPU time over wall
//! time during the timed steps; `cores` is what the process may use), `peak_mem_bytes` (CUDA:
//! the memory pool's high-water mark over the timed steps, as `torch.cuda.max_memory_allocated`),
//! and with
//! `--breakdown` the GPU time per custom op and per phase (forward, backward, optimizer; timed
//! with events on extra steps, after the timed ones).
//!
//! With `--nproc-per-node N` (N ranks as threads on the CPU, N processes with NCCL on GPUs, or a
//! worker of torchrun/Slurm) every rank runs the step on its own batch and the gradients are
//! summed over the ranks before LAMB, as in `train` (in buckets that start during the explicit
//! backward); the line then has `images_per_s` over all ranks, `images_per_s_per_gpu`,
//! `world_size`, and `allreduce_exposed_ms`: how much longer a step takes with the gradient
//! all-reduce than the same steps without it (timed right after, in the same run), i.e. the
//! communication time the backward does not hide.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use clap::Parser;
use serde_json::json;
use trainer::feed::Feed;
use trainer::loss::Targets;
use trainer::model::{ActivationLayout, BackwardMode, NetConfig};
use trainer::optim::param_groups;
use trainer::recipe::Recipe;

#[derive(Parser, Debug)]
#[command(
    name = "train-bench",
    about = "Training-step throughput on synthetic data"
)]
struct Args {
    /// Model name (timm).
    #[arg(long, default_value = "resnet50")]
    model: String,
    /// Images per step.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps first (cuDNN algorithm search, kernel compilation, memory pool growth).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Activation layout: auto = nhwc (the fast path on CUDA and on the CPU); nchw = candle's ops.
    #[arg(long, default_value = "auto")]
    layout: String,
    /// Activation dtype: auto = bf16 on CUDA, f32 on the CPU.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Backward: auto = explicit on the fast path, candle's graph elsewhere.
    #[arg(long, default_value = "auto")]
    backward: BackwardMode,
    /// Classes.
    #[arg(long, default_value_t = 1000)]
    num_classes: usize,
    /// Also time each custom op and each phase (on 3 extra steps).
    #[arg(long)]
    breakdown: bool,
    /// CUDA: the fastest deterministic cuDNN algorithm per convolution (default: the fastest,
    /// as PyTorch's `cudnn.benchmark`).
    #[arg(long)]
    deterministic: bool,
    /// Ranks on this machine: threads with `--device cpu`, one process per GPU with CUDA.
    #[arg(long)]
    nproc_per_node: Option<usize>,
    /// Seconds a rank waits for the others.
    #[arg(long, default_value_t = 300)]
    dist_timeout: u64,
    /// Time the evaluation forward (running statistics, no gradients) instead of the training
    /// step.
    #[arg(long)]
    eval: bool,
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize().context("device synchronize")
}

fn run(args: Args) -> Result<()> {
    use tools::ranks;
    use trainer::dist::{RankInfo, SingleRank, ThreadGroup};
    let timeout = std::time::Duration::from_secs(args.dist_timeout);
    if let Some(info) = RankInfo::from_env()?.filter(|i| i.world_size > 1) {
        // A worker: the recipe is fixed (A1), so ranks compare the benchmark's arguments.
        let what = format!(
            "{} {} {} {:?} {}",
            args.model, args.batch_size, args.size, args.backward, args.steps
        );
        return match ranks::join(&info, what, &args.device, timeout)? {
            ranks::Joined::Test(mode) => ranks::test_mode(&mode, &info),
            ranks::Joined::Nccl(token) => {
                let (dev, mut comm) = ranks::gpu_rank(&info, &token, timeout)?;
                print_line(bench(&args, dev, comm.as_mut())?)
            }
        };
    }
    let nproc = args.nproc_per_node.unwrap_or(1);
    if nproc > 1 && args.device != "cpu" {
        return ranks::launch_self(nproc);
    }
    let dev = tools::bench::parse_device(&args.device)?;
    if nproc <= 1 {
        return print_line(bench(&args, dev, &mut SingleRank)?);
    }
    let lines: Vec<Result<Option<serde_json::Value>>> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(nproc, timeout)
            .into_iter()
            .map(|mut g| {
                let (args, dev) = (&args, dev.clone());
                s.spawn(move || bench(args, dev, &mut g))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a rank panicked")))
            .collect()
    });
    let mut first = None;
    for (rank, l) in lines.into_iter().enumerate() {
        match l {
            Err(e) => bail!("rank {rank}: {e:#}"),
            Ok(v) if rank == 0 => first = v,
            Ok(_) => {}
        }
    }
    print_line(first)
}

fn print_line(line: Option<serde_json::Value>) -> Result<()> {
    if let Some(l) = line {
        println!("{l}");
    }
    Ok(())
}

/// The benchmark as one rank of `comm`; rank 0 returns the line.
fn bench(
    args: &Args,
    dev: Device,
    comm: &mut dyn trainer::dist::Collective,
) -> Result<Option<serde_json::Value>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    #[cfg(feature = "cuda")]
    trainer::cuda::conv::set_deterministic(args.deterministic);
    // Channels-last everywhere by default: the fast path (cuDNN and our kernels on CUDA, the
    // CPU kernels of trainer::ops::cpu on the CPU); nchw measures candle's own ops.
    let layout = match args.layout.as_str() {
        "auto" | "nhwc" => ActivationLayout::Nhwc,
        "nchw" => ActivationLayout::Nchw,
        l => bail!("--layout {l:?}: expected auto, nchw or nhwc"),
    };
    let dtype = match (args.dtype.as_str(), dev.is_cuda()) {
        ("auto", true) | ("bf16", _) => DType::BF16,
        ("auto", false) | ("f32", _) => DType::F32,
        (d, _) => bail!("--dtype {d:?}: expected auto, bf16 or f32"),
    };
    if args.batch_size < 2 || args.steps == 0 {
        bail!("--batch-size must be at least 2 and --steps at least 1")
    }
    let recipe = Recipe::a1();
    let cfg = NetConfig::by_name(&args.model)?
        .with_num_classes(args.num_classes)
        .with_drop_path_rate(recipe.model.drop_path_rate)
        // As the trainer: a ViT's position embedding laid out for the training size.
        .with_img_size(args.size);
    let varmap = VarMap::new();
    let mut model = cfg.build_seeded(&varmap, 0, DType::F32, &dev)?;
    model.set_layout(layout);
    model.set_backward_mode(args.backward);
    let groups = param_groups(model.trainable_vars()?, recipe.optim.weight_decay);
    let mut opt = trainer::backend::lamb(groups, recipe.lamb_config(), &dev)?;
    let loss_fn = recipe.train_loss();

    // GPU-resident inputs: random pixels, normalised once, in the model's layout and dtype.
    let (b, s) = (args.batch_size, args.size);
    let mut rng = loader::rng::Rng::for_item(7, &[]);
    let pixels: Vec<u8> = (0..b * s * s * 3).map(|_| rng.below(256) as u8).collect();
    let feed = Feed::with_normalization(&dev, model.config().normalization())?;
    let xs = feed.images(&pixels, b, s)?;
    let xs = match layout {
        ActivationLayout::Nchw => xs.to_dtype(dtype)?,
        ActivationLayout::Nhwc => xs.permute((0, 2, 3, 1))?.to_dtype(dtype)?.contiguous()?,
    };
    let labels: Vec<u32> = (0..b)
        .map(|_| rng.below(args.num_classes as u64) as u32)
        .collect();
    let dense =
        loader::mix::mixed_targets(&labels, args.num_classes, 1.0, recipe.augment.smoothing);
    let targets = feed.targets(&dense, b, args.num_classes)?;

    if args.eval {
        if world > 1 {
            bail!("--eval runs on one rank")
        }
        return bench_eval(args, &model, &xs, &dev).map(Some);
    }

    let mut step_no = 0u64;
    let explicit = std::cell::Cell::new(false);
    let trainable = model.trainable_vars()?;
    // Whether steps sum their gradients over the ranks (off for the comparison run).
    let reduce = std::cell::Cell::new(true);
    let mut step = |phases: bool| -> Result<(f32, [f64; 3])> {
        let mut t = [0f64; 3];
        let t0 = Instant::now();
        let (logits, pass) = model.forward_train_pass(&xs, loader::rng::derive(0, &[step_no]))?;
        explicit.set(pass.is_explicit());
        let loss = loss_fn.forward(&logits, Targets::Dense(&targets))?;
        if phases {
            sync(&dev)?;
            t[0] = t0.elapsed().as_secs_f64();
        }
        let t1 = Instant::now();
        let grads = if world > 1 && reduce.get() {
            // As `train`: buckets of the gradients start while the backward runs.
            let acc = trainer::train::GradAccumulator::new(&trainable);
            let mut red =
                trainer::train::BucketReducer::new(acc, &mut *comm, trainer::train::BUCKET_BYTES);
            let rest = pass.backward_hooked(&loss, &mut |g| {
                red.ready(g).map_err(candle_core::Error::wrap)
            })?;
            red.finish(rest)?
        } else {
            pass.backward(&loss)?
        };
        if phases {
            sync(&dev)?;
            t[1] = t1.elapsed().as_secs_f64();
        }
        let t2 = Instant::now();
        // Queued: as in `train`, the host does not wait for the update.
        opt.queue_step(&grads, 1e-3)?;
        if phases {
            sync(&dev)?;
            t[2] = t2.elapsed().as_secs_f64();
        }
        step_no += 1;
        let l = if phases {
            loss.to_scalar::<f32>()?
        } else {
            f32::NAN
        };
        Ok((l, t))
    };

    let t_warm = Instant::now();
    for _ in 0..args.warmup {
        step(false)?;
    }
    sync(&dev)?;
    let warmup_s = t_warm.elapsed().as_secs_f64();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        trainer::cuda::memory::reset_peak_used(d)?;
    }
    let mut timed = |reduce_now: bool| -> Result<f64> {
        reduce.set(reduce_now);
        let t0 = Instant::now();
        for _ in 0..args.steps {
            step(false)?;
        }
        sync(&dev)?;
        Ok(t0.elapsed().as_secs_f64() / args.steps as f64)
    };
    let cpu0 = tools::bench::cpu_seconds();
    let t_timed = Instant::now();
    let dt = timed(true)?;
    let busy = busy_cores(cpu0, t_timed);
    // The same steps without the all-reduce: the difference is what the backward does not hide.
    let dt_local = if world > 1 { Some(timed(false)?) } else { None };
    let exposed_ms = dt_local.map(|d| (dt - d) * 1e3);
    reduce.set(true);
    #[allow(unused_mut)]
    let mut peak: Option<u64> = None;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        peak = Some(trainer::cuda::memory::peak_used(d)?);
    }

    let mut line = json!({
        "bench": "train-bench", "mode": "train",
        "cpu_busy_cores": busy, "cores": tools::bench::cores(),
        "model": args.model, "batch_size": b, "size": s, "steps": args.steps,
        "warmup_steps": args.warmup, "warmup_s": warmup_s,
        "device": args.device, "layout": format!("{layout:?}").to_lowercase(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "backward": if explicit.get() { "explicit" } else { "graph" },
        "images_per_s": (b * world) as f64 / dt, "ms_per_step": dt * 1e3,
        "images_per_s_per_gpu": b as f64 / dt, "world_size": world,
        "allreduce_exposed_ms": exposed_ms,
        "ms_per_step_without_allreduce": dt_local.map(|d| d * 1e3),
        "peak_mem_bytes": peak,
        "deterministic": args.deterministic,
        "git_rev": tools::bench::git_rev(),
    });
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &dev {
        // What ran: GPU, driver, NVRTC and cuDNN versions, how the kernels were built, and how
        // many convolution shapes were searched or read from the start-up cache.
        let (searched, from_disk, cache) = trainer::cuda::conv::plan_stats(d);
        let obj = line.as_object_mut().expect("object");
        obj.insert(
            "cuda".into(),
            json!(trainer::cuda::device::DeviceInfo::of(d)?),
        );
        obj.insert(
            "kernels".into(),
            json!(trainer::cuda::kernels::build_info(d)),
        );
        obj.insert(
            "cudnn_plans".into(),
            json!({"searched": searched, "from_disk_cache": from_disk, "cache": cache}),
        );
    }
    if args.breakdown {
        let n = 3;
        #[cfg(feature = "cuda")]
        trainer::cuda::profile::enable(true);
        let mut phases = [0f64; 3];
        let mut loss = 0f32;
        for _ in 0..n {
            let (l, t) = step(true)?;
            loss = l;
            for (p, v) in phases.iter_mut().zip(t) {
                *p += v / n as f64;
            }
        }
        let obj = line.as_object_mut().expect("object");
        obj.insert("loss".into(), json!(loss));
        obj.insert(
            "phase_ms".into(),
            json!({"forward_and_loss": phases[0] * 1e3, "backward": phases[1] * 1e3, "optimizer": phases[2] * 1e3}),
        );
        #[cfg(feature = "cuda")]
        {
            let ops: serde_json::Map<String, serde_json::Value> = trainer::cuda::profile::summary()
                .into_iter()
                .map(|(k, (ms, count))| {
                    (
                        k.to_string(),
                        json!({"ms_per_step": ms / n as f64, "calls_per_step": count / n}),
                    )
                })
                .collect();
            trainer::cuda::profile::enable(false);
            obj.insert("op_ms".into(), serde_json::Value::Object(ops));
        }
    }
    Ok((rank == 0).then_some(line))
}

/// CPU time over wall time since `cpu0` and `t0`: how many cores were busy on average.
fn busy_cores(cpu0: Option<f64>, t0: Instant) -> Option<f64> {
    let wall = t0.elapsed().as_secs_f64();
    Some((tools::bench::cpu_seconds()? - cpu0?) / wall)
}

/// `--eval`: images/s of the evaluation forward on `xs`.
fn bench_eval(
    args: &Args,
    model: &trainer::model::ResNet,
    xs: &candle_core::Tensor,
    dev: &Device,
) -> Result<serde_json::Value> {
    // As `train` and `evaluate` run an evaluation pass: the CPU fast path folds each conv's
    // filter once for the pass (the first, untimed step), not per batch.
    trainer::ops::cpu::with_eval_cache(|| -> Result<serde_json::Value> {
        let t_warm = Instant::now();
        for _ in 0..args.warmup {
            model.forward_eval(xs)?;
        }
        sync(dev)?;
        let warmup_s = t_warm.elapsed().as_secs_f64();
        let cpu0 = tools::bench::cpu_seconds();
        let t0 = Instant::now();
        for _ in 0..args.steps {
            model.forward_eval(xs)?;
        }
        sync(dev)?;
        let dt = t0.elapsed().as_secs_f64() / args.steps as f64;
        let busy = busy_cores(cpu0, t0);
        eval_line(args, model, xs, warmup_s, dt, busy)
    })
}

/// The JSON line of `--eval`.
fn eval_line(
    args: &Args,
    model: &trainer::model::ResNet,
    xs: &candle_core::Tensor,
    warmup_s: f64,
    dt: f64,
    busy: Option<f64>,
) -> Result<serde_json::Value> {
    Ok(json!({
        "bench": "train-bench", "mode": "eval",
        "model": args.model, "batch_size": args.batch_size, "size": args.size,
        "steps": args.steps, "warmup_steps": args.warmup, "warmup_s": warmup_s,
        "device": args.device, "layout": format!("{:?}", model.layout()).to_lowercase(),
        "dtype": format!("{:?}", xs.dtype()).to_lowercase(),
        "images_per_s": args.batch_size as f64 / dt, "ms_per_step": dt * 1e3,
        "cpu_busy_cores": busy, "cores": tools::bench::cores(),
        "git_rev": tools::bench::git_rev(),
    }))
}

fn main() -> std::process::ExitCode {
    tools::alloc::tune();
    tools::bench::exit_on_error("train-bench", run(Args::parse()))
}
