//! What the multi-rank programs (`train`, `train-bench`) share: starting one worker process per
//! GPU, the code version the ranks compare at the rendezvous, and a GPU rank's device and NCCL
//! communicator.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use trainer::dist::{rendezvous, Collective, Hello, RankInfo, RendezvousOptions};

/// Test mode of the multi-process path: `rendezvous` makes each worker exit after the
/// rendezvous; `fail:R` makes rank R fail right after it while the others wait (until the
/// launcher stops them). Lets CI test the launcher and the rendezvous without GPUs.
pub const TEST_VAR: &str = "RSB_DIST_TEST";

/// `PROGRAM --nproc-per-node N ...` on GPUs: N copies of this command without that flag, one per
/// GPU, each a rank (`trainer::dist::launch_local`). Returns when all have ended; an error names
/// the first failing rank and its last error line.
pub fn launch_self(nproc: usize) -> Result<()> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc-per-node" {
            it.next();
        } else if !a.to_string_lossy().starts_with("--nproc-per-node=") {
            args.push(a);
        }
    }
    let program = std::env::current_exe().context("finding this program to start the workers")?;
    eprintln!("starting {nproc} worker processes (one per GPU)");
    let outcome = trainer::dist::launch_local(&trainer::dist::LaunchOptions {
        nproc,
        program,
        args,
        master_port: None,
        grace: Duration::from_secs(10),
    })?;
    if let Some((rank, reason)) = outcome.failed {
        bail!(
            "rank {rank} failed (exit code {}): {reason}; the other ranks were stopped",
            outcome.exit_code
        );
    }
    if outcome.exit_code == trainer::train::stop::EXIT_STOPPED {
        eprintln!(
            "train: the workers stopped on a signal after a checkpoint; continue with --resume"
        );
        std::process::exit(trainer::train::stop::EXIT_STOPPED);
    }
    Ok(())
}

/// This program's version: the crate version and a hash of the executable, so ranks running
/// different builds are told apart at the rendezvous.
pub fn code_version() -> String {
    use sha2::{Digest, Sha256};
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| {
            Sha256::digest(&b)
                .iter()
                .take(6)
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{}+{exe}", env!("CARGO_PKG_VERSION"))
}

/// NCCL's unique id (rank 0 hands it out at the rendezvous).
#[cfg(feature = "nccl")]
pub fn nccl_unique_id() -> trainer::dist::Result<Vec<u8>> {
    trainer::cuda::nccl::Nccl::unique_id()
}

/// Without NCCL: the error that says how to get it.
#[cfg(not(feature = "nccl"))]
pub fn nccl_unique_id() -> trainer::dist::Result<Vec<u8>> {
    Err(trainer::dist::DistError::Unsupported(
        "this binary was built without NCCL: rebuild with `--features nccl` \
         (scripts/build-cuda.sh does) for multi-GPU training"
            .into(),
    ))
}

/// A GPU rank: its device (`cuda:LOCAL_RANK`, one GPU per rank) and its NCCL communicator.
#[cfg(feature = "nccl")]
pub fn gpu_rank(
    info: &RankInfo,
    token: &[u8],
    timeout: Duration,
) -> Result<(candle_core::Device, Box<dyn Collective>)> {
    let dev = trainer::cuda::device::open(info.local_rank)
        .with_context(|| format!("rank {}: opening cuda:{}", info.rank, info.local_rank))?;
    let comm = trainer::backend::gpu_collective(&dev, info, token, timeout)
        .with_context(|| format!("rank {}", info.rank))?;
    if info.rank == 0 {
        eprintln!(
            "rank 0 of {}: NCCL {} ({} rank(s) per machine)",
            info.world_size,
            trainer::cuda::nccl::Nccl::version().unwrap_or_default(),
            info.local_world_size
        );
    }
    Ok((dev, comm))
}

/// Without NCCL: the error that says how to get it.
#[cfg(not(feature = "nccl"))]
pub fn gpu_rank(
    _: &RankInfo,
    _: &[u8],
    _: Duration,
) -> Result<(candle_core::Device, Box<dyn Collective>)> {
    Err(nccl_unique_id().unwrap_err().into())
}

/// The test mode's action after the rendezvous (see [`TEST_VAR`]).
pub fn test_mode(mode: &str, info: &RankInfo) -> Result<()> {
    eprintln!(
        "rank {} of {}: rendezvous complete (test mode {mode})",
        info.rank, info.world_size
    );
    if mode == format!("fail:{}", info.rank) {
        bail!("planted failure of rank {} ({TEST_VAR})", info.rank);
    }
    if mode.starts_with("fail:") {
        std::thread::sleep(Duration::from_secs(60));
    }
    Ok(())
}

/// What a worker does after the rendezvous.
pub enum Joined {
    /// The test mode named by [`TEST_VAR`] (no GPU, no NCCL).
    Test(String),
    /// Train or benchmark on the GPU with this NCCL unique id.
    Nccl(Vec<u8>),
}

/// Meets the other ranks of `info`'s world (`trainer::dist::rendezvous`), comparing the recipe
/// hash (`what` for programs without one) and the code version. A CPU worker is refused outside
/// the test mode: across processes, ranks are GPUs.
pub fn join(
    info: &RankInfo,
    recipe_hash: String,
    device: &str,
    timeout: Duration,
) -> Result<Joined> {
    let test = std::env::var(TEST_VAR).ok();
    if device == "cpu" && test.is_none() {
        bail!(
            "a CPU run across processes or machines is not supported: use `--nproc-per-node N \
             --device cpu` (N ranks as threads in one process), or GPUs"
        );
    }
    let hello = Hello {
        rank: info.rank,
        world_size: info.world_size,
        recipe_hash,
        code_version: code_version(),
    };
    let gpu = test.is_none();
    let rv = rendezvous(
        info,
        &hello,
        || {
            if gpu {
                nccl_unique_id()
            } else {
                Ok(vec![])
            }
        },
        &RendezvousOptions { timeout },
    )
    .with_context(|| format!("rank {} of {}", info.rank, info.world_size))?;
    Ok(match test {
        Some(mode) => Joined::Test(mode),
        None => Joined::Nccl(rv.token),
    })
}
