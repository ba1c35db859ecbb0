//! Data-parallel training: which rank this process (or thread) is, the collective the ranks
//! reduce through, and the fixed summation order that makes W ranks compute what one rank with
//! W times the micro-batches computes.
//!
//! # Ranks
//!
//! [`RankInfo`] comes from torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) or Slurm's (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, with `MASTER_ADDR` from the job
//! script), or is one rank of one.
//!
//! # Collectives
//!
//! [`Collective`] is what a rank of the training loop sees: sums over ranks of gradients (f32
//! tensors) and of host values (f64: losses, evaluation counts), a broadcast and a barrier.
//! Implementations: [`SingleRank`] (world size 1, nothing to do), [`ThreadGroup`] (ranks as
//! threads of one process, used by `train --nproc-per-node N --device cpu` and the tests), and
//! NCCL on CUDA (`cuda::nccl`, feature `nccl`).
//!
//! # Summation order
//!
//! Every sum over micro-batches and over ranks is a [`TreeSum`]: a binary tree in order, built as
//! a binary counter. For a power-of-two count it is the balanced tree, whose aligned blocks are
//! subtrees; so W ranks (a power of two) each summing A micro-batches (a power of two), then
//! summing the ranks' totals in rank order, perform exactly the additions one rank performs over
//! W x A micro-batches (the plan's virtual rank `r * A + a` is that rank's micro-batch). With each
//! micro-batch's loss divided by W x A on every rank, gradients, losses and so the whole
//! optimizer trajectory are then bit-identical to the one-rank run on the CPU (BatchNorm running
//! statistics aside: they are per device, as in timm without `--sync-bn`). Other counts give the
//! same sums up to rounding.

mod launch;
mod rendezvous;
mod thread_group;

pub use launch::{launch_local, LaunchOptions};
pub use rendezvous::{rendezvous, Hello, Rendezvous, RendezvousOptions};
pub use thread_group::ThreadGroup;

use candle_core::Tensor;

/// Errors of the distributed layer. Messages name the rank and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// An environment variable is missing or malformed.
    #[error("{var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// Ranks disagree on something they must share (recipe, code version, world size).
    #[error("rank {rank}: {field} differs from rank 0's ({theirs} against {ours}); every rank must run the same command")]
    Mismatch {
        /// The rank that differs.
        rank: usize,
        /// What differs.
        field: String,
        /// Rank 0's value.
        ours: String,
        /// The rank's value.
        theirs: String,
    },
    /// Some ranks did not arrive in time.
    #[error("{what}: rank(s) {missing:?} did not arrive within {timeout_s} s")]
    Timeout {
        /// Which exchange.
        what: String,
        /// The ranks that are missing.
        missing: Vec<usize>,
        /// The timeout.
        timeout_s: f64,
    },
    /// Another rank failed or left; this one stops too.
    #[error("rank {rank} stopped: {reason}")]
    PeerFailed {
        /// The rank that failed.
        rank: usize,
        /// Its reason.
        reason: String,
    },
    /// A network error of the rendezvous.
    #[error("rendezvous at {addr}: {message}")]
    Net {
        /// The address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// A tensor operation failed.
    #[error("collective tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// Something this setup does not support.
    #[error("{0}")]
    Unsupported(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, DistError>;

/// Where this process (or thread) sits among the ranks of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank on this machine (the GPU index).
    pub local_rank: usize,
    /// Ranks on this machine.
    pub local_world_size: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 serves the rendezvous (multi-process only).
    pub master: Option<String>,
}

impl RankInfo {
    /// One rank of one.
    pub fn single() -> Self {
        RankInfo {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master: None,
        }
    }

    /// Rank 0 writes checkpoints and metrics.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The rank from the process environment (torchrun's variables first, then Slurm's), or
    /// `None` when neither names a world.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`RankInfo::from_env`] over any variable lookup (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |var: &str| -> Result<Option<usize>> {
            match get(var) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| DistError::Env {
                        var: var.into(),
                        message: format!("{v:?} is not a non-negative integer"),
                    }),
            }
        };
        let need = |var: &str| -> Result<usize> {
            num(var)?.ok_or_else(|| DistError::Env {
                var: var.into(),
                message: "not set (set with the other rank variables)".into(),
            })
        };
        let (rank, world, local, local_world) =
            if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
                let rank = need("RANK")?;
                let world = need("WORLD_SIZE")?;
                let local = num("LOCAL_RANK")?.unwrap_or(rank);
                let local_world = num("LOCAL_WORLD_SIZE")?.unwrap_or(world);
                (rank, world, local, local_world)
            } else if get("SLURM_PROCID").is_some() {
                let rank = need("SLURM_PROCID")?;
                let world = need("SLURM_NTASKS")?;
                let local = num("SLURM_LOCALID")?.unwrap_or(0);
                // "4" or "4(x2)" (Slurm's compressed form for uniform nodes).
                let local_world = match get("SLURM_NTASKS_PER_NODE") {
                    None => world,
                    Some(v) => {
                        let head = v.split(['(', ',']).next().unwrap_or("").trim().to_string();
                        head.parse::<usize>().map_err(|_| DistError::Env {
                            var: "SLURM_NTASKS_PER_NODE".into(),
                            message: format!("{v:?}: expected a task count such as 4 or 4(x2)"),
                        })?
                    }
                };
                (rank, world, local, local_world)
            } else {
                return Ok(None);
            };
        if world == 0 || rank >= world {
            return Err(DistError::Env {
                var: "RANK".into(),
                message: format!("rank {rank} is outside world size {world}"),
            });
        }
        if local_world == 0 || local >= local_world {
            return Err(DistError::Env {
                var: "LOCAL_RANK".into(),
                message: format!("local rank {local} is outside local world size {local_world}"),
            });
        }
        let master = match (get("MASTER_ADDR"), get("MASTER_PORT")) {
            (Some(a), Some(p)) => {
                let port: u16 = p.trim().parse().map_err(|_| DistError::Env {
                    var: "MASTER_PORT".into(),
                    message: format!("{p:?} is not a port number"),
                })?;
                Some(format!("{}:{port}", a.trim()))
            }
            (None, None) if world == 1 => None,
            (None, _) => {
                return Err(DistError::Env {
                    var: "MASTER_ADDR".into(),
                    message: "not set: the address of rank 0's machine (torchrun and Slurm job \
                              scripts export it)"
                        .into(),
                })
            }
            (Some(_), None) => {
                return Err(DistError::Env {
                    var: "MASTER_PORT".into(),
                    message: "not set: a free TCP port on rank 0's machine".into(),
                })
            }
        };
        Ok(Some(RankInfo {
            rank,
            world_size: world,
            local_rank: local,
            local_world_size: local_world,
            master,
        }))
    }
}

/// What the ranks of a run share: sums over ranks, a broadcast, a barrier. Every rank calls the
/// same operations in the same order (as with NCCL); a rank that fails makes the others' next
/// call fail with its reason, and a rank that does not arrive makes it fail after the timeout.
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// The sum over ranks of each f32 tensor (every rank passes the same shapes), in rank order
    /// as a [`TreeSum`] on the host implementations.
    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Starts [`Collective::all_reduce_sum`] of `tensors`; [`PendingSum::wait`] gives the sums.
    /// A device collective runs it on a stream of its own, so the work queued after this call
    /// (the rest of a backward pass) overlaps it; the host collectives finish it here.
    fn start_sum(&mut self, tensors: &[Tensor]) -> Result<Box<dyn PendingSum>> {
        Ok(Box::new(Ready(self.all_reduce_sum(tensors)?)))
    }
    /// The sum over ranks of each value, in place (f64, [`TreeSum`] over ranks).
    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<()>;
    /// Rank `root`'s bytes, on every rank.
    fn broadcast_bytes(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Waits until every rank has arrived.
    fn barrier(&mut self) -> Result<()>;
    /// Tells the other ranks this one stopped (on error), so they stop instead of waiting.
    fn abort(&mut self, reason: &str);
}

/// A sum over ranks started by [`Collective::start_sum`].
pub trait PendingSum {
    /// The sums, in the order of the tensors started. On a device, work queued after this call
    /// is ordered after the sum (a device-side wait, not a host one).
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>>;
}

/// A sum that finished when it was started.
pub struct Ready(pub Vec<Tensor>);

impl PendingSum for Ready {
    fn wait(self: Box<Self>) -> Result<Vec<Tensor>> {
        Ok(self.0)
    }
}

/// World size 1: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(tensors.to_vec())
    }
    fn all_reduce_f64(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&mut self, _: usize, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn abort(&mut self, _: &str) {}
}

/// A sum in a fixed binary-tree order: items are pushed in order and merged like a binary
/// counter (two partial sums of equal size are added, the earlier on the left). For 2^k items
/// this is the balanced tree; otherwise the left-aligned power-of-two blocks, then their totals
/// from the right. At most `log2(n) + 1` partial sums are held.
pub struct TreeSum<T> {
    stack: Vec<(u64, T)>,
}

impl<T> Default for TreeSum<T> {
    fn default() -> Self {
        TreeSum { stack: Vec::new() }
    }
}

impl<T> TreeSum<T> {
    /// An empty sum.
    pub fn new() -> Self {
        Self::default()
    }

    /// True before the first item.
    pub fn is_empty(&self) -> bool {
        self.stack.is_empty()
    }

    /// Adds the next item; `add(left, right)` combines two partial sums.
    pub fn push<E>(
        &mut self,
        item: T,
        mut add: impl FnMut(T, T) -> std::result::Result<T, E>,
    ) -> std::result::Result<(), E> {
        let mut cur = (1u64, item);
        while let Some((n, _)) = self.stack.last() {
            if *n != cur.0 {
                break;
            }
            let (n, left) = self.stack.pop().expect("checked above");
            cur = (n + cur.0, add(left, cur.1)?);
        }
        self.stack.push(cur);
        Ok(())
    }

    /// The total (`None` when empty).
    pub fn finish<E>(
        mut self,
        mut add: impl FnMut(T, T) -> std::result::Result<T, E>,
    ) -> std::result::Result<Option<T>, E> {
        let Some((_, mut acc)) = self.stack.pop() else {
            return Ok(None);
        };
        while let Some((_, left)) = self.stack.pop() {
            acc = add(left, acc)?;
        }
        Ok(Some(acc))
    }
}

/// The [`TreeSum`] of `items` in order.
pub fn tree_sum<T, E>(
    items: impl IntoIterator<Item = T>,
    mut add: impl FnMut(T, T) -> std::result::Result<T, E>,
) -> std::result::Result<Option<T>, E> {
    let mut t = TreeSum::new();
    for item in items {
        t.push(item, &mut add)?;
    }
    t.finish(add)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree as a string, to see the order of additions.
    fn shape(n: usize) -> String {
        tree_sum((0..n).map(|i| i.to_string()), |a, b| {
            Ok::<_, ()>(format!("({a}+{b})"))
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn tree_order() {
        assert_eq!(shape(1), "0");
        assert_eq!(shape(2), "(0+1)");
        assert_eq!(shape(3), "((0+1)+2)");
        assert_eq!(shape(4), "((0+1)+(2+3))");
        assert_eq!(shape(6), "(((0+1)+(2+3))+(4+5))");
        assert_eq!(shape(8), "(((0+1)+(2+3))+((4+5)+(6+7)))");
        // 2 ranks x 4 micro-batches = the 8-leaf tree: per-rank totals are its subtrees.
        let ranks: Vec<String> = (0..2)
            .map(|r| {
                tree_sum((0..4).map(|a| (r * 4 + a).to_string()), |a, b| {
                    Ok::<_, ()>(format!("({a}+{b})"))
                })
                .unwrap()
                .unwrap()
            })
            .collect();
        let two_level = tree_sum(ranks, |a, b| Ok::<_, ()>(format!("({a}+{b})")))
            .unwrap()
            .unwrap();
        assert_eq!(two_level, shape(8));
        assert_eq!(
            tree_sum(Vec::<String>::new(), |a, b| Ok::<_, ()>(a + &b)).unwrap(),
            None
        );
    }

    #[test]
    fn rank_from_torchrun_and_slurm_variables() {
        let vars = |pairs: &[(&str, &str)]| {
            let m: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| m.get(k).cloned()
        };
        assert_eq!(RankInfo::from_vars(vars(&[])).unwrap(), None);
        let r = RankInfo::from_vars(vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.rank, r.world_size, r.local_rank, r.local_world_size),
            (5, 8, 1, 4)
        );
        assert_eq!(r.master.as_deref(), Some("node0:29500"));
        let s = RankInfo::from_vars(vars(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("MASTER_ADDR", "gpu-a1"),
            ("MASTER_PORT", "12345"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.rank, s.world_size, s.local_rank, s.local_world_size),
            (3, 8, 3, 4)
        );
        // Errors name the variable.
        let e = RankInfo::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().starts_with("RANK:"), "{e}");
        let e = RankInfo::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("outside world size 2"), "{e}");
        let e = RankInfo::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().starts_with("MASTER_ADDR:"), "{e}");
        let e = RankInfo::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
        ]))
        .unwrap_err();
        assert!(e.to_string().starts_with("MASTER_PORT:"), "{e}");
    }
}
