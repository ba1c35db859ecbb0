//! Ranks as threads of one process: the in-process [`Collective`].
//!
//! Each rank deposits its part in a shared slot; the last to arrive combines the parts in rank
//! order (a [`TreeSum`](super::TreeSum) over ranks, so the result is a function of the inputs,
//! not of thread timing) and every rank reads the same result. A rank that stops (an error, a
//! panic, or leaving early) marks the group failed, and every other rank's current or next call
//! fails with its reason; a rank that waits longer than the timeout fails naming the ranks that
//! did not arrive, and fails the group with it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{tree_sum, Collective, DistError, Result};

/// One rank's handle on a group of ranks in this process.
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
    timeout: Duration,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

enum Payload {
    F32(Vec<Vec<f32>>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    Unit,
}

impl Payload {
    fn kind(&self) -> &'static str {
        match self {
            Payload::F32(_) => "tensors",
            Payload::F64(_) => "values",
            Payload::Bytes(_) => "bytes",
            Payload::Unit => "a barrier",
        }
    }
}

struct State {
    /// Completed exchanges.
    generation: u64,
    /// This exchange's parts, by rank.
    slots: Vec<Option<Payload>>,
    /// The last completed exchange's result.
    result: Option<Arc<Payload>>,
    /// The first rank that stopped, and why.
    failed: Option<(usize, String)>,
}

impl ThreadGroup {
    /// Handles for ranks `0..world_size`, to be moved one into each rank's thread. A call waits
    /// at most `timeout` for the other ranks.
    pub fn new(world_size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world: world_size,
            state: Mutex::new(State {
                generation: 0,
                slots: (0..world_size).map(|_| None).collect(),
                result: None,
                failed: None,
            }),
            cv: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                shared: shared.clone(),
                rank,
                timeout,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left consistent state (every write is
        // one assignment), so the poison is not an error here.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, st: &mut State, reason: String) {
        if st.failed.is_none() {
            st.failed = Some((self.rank, reason));
        }
        self.shared.cv.notify_all();
    }

    /// Deposits `part`; the last rank combines all parts (in rank order) with `combine`.
    fn exchange(
        &self,
        what: &str,
        part: Payload,
        combine: impl FnOnce(Vec<Payload>) -> Result<Payload>,
    ) -> Result<Arc<Payload>> {
        let mut st = self.lock();
        if let Some((rank, reason)) = &st.failed {
            return Err(DistError::PeerFailed {
                rank: *rank,
                reason: reason.clone(),
            });
        }
        let generation = st.generation;
        st.slots[self.rank] = Some(part);
        if st.slots.iter().all(Option::is_some) {
            let parts: Vec<Payload> = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            match combine(parts) {
                Ok(r) => {
                    let r = Arc::new(r);
                    st.result = Some(r.clone());
                    st.generation += 1;
                    self.shared.cv.notify_all();
                    return Ok(r);
                }
                Err(e) => {
                    self.fail(&mut st, e.to_string());
                    return Err(e);
                }
            }
        }
        let start = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(start.elapsed());
            let (guard, _) = self
                .shared
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            if st.generation > generation {
                return Ok(st.result.clone().expect("set with the generation"));
            }
            if let Some((rank, reason)) = &st.failed {
                return Err(DistError::PeerFailed {
                    rank: *rank,
                    reason: reason.clone(),
                });
            }
            if start.elapsed() >= self.timeout {
                let missing: Vec<usize> = (0..self.shared.world)
                    .filter(|&r| st.slots[r].is_none())
                    .collect();
                let e = DistError::Timeout {
                    what: format!("{what} (rank {})", self.rank),
                    missing,
                    timeout_s: self.timeout.as_secs_f64(),
                };
                self.fail(&mut st, e.to_string());
                return Err(e);
            }
        }
    }
}

/// Checks that every rank passed the same kind and sizes of data.
fn check_parts(parts: &[Payload], sizes: impl Fn(&Payload) -> Vec<usize>) -> Result<()> {
    let first = &parts[0];
    for (rank, p) in parts.iter().enumerate().skip(1) {
        if p.kind() != first.kind() {
            return Err(DistError::Mismatch {
                rank,
                field: "the kind of a collective call".into(),
                ours: first.kind().into(),
                theirs: p.kind().into(),
            });
        }
        let (a, b) = (sizes(first), sizes(p));
        if a != b {
            return Err(DistError::Mismatch {
                rank,
                field: "the size of a collective call".into(),
                ours: format!("{a:?}"),
                theirs: format!("{b:?}"),
            });
        }
    }
    Ok(())
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut host = Vec::with_capacity(tensors.len());
        for t in tensors {
            host.push(
                t.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        let r = self.exchange("all-reduce of gradients", Payload::F32(host), |parts| {
            check_parts(&parts, |p| match p {
                Payload::F32(v) => v.iter().map(Vec::len).collect(),
                _ => vec![],
            })?;
            let per_rank = parts.into_iter().map(|p| match p {
                Payload::F32(v) => v,
                _ => unreachable!("checked"),
            });
            let sum = tree_sum(per_rank, |mut a: Vec<Vec<f32>>, b: Vec<Vec<f32>>| {
                for (x, y) in a.iter_mut().zip(&b) {
                    for (u, v) in x.iter_mut().zip(y) {
                        *u += *v;
                    }
                }
                Ok::<_, DistError>(a)
            })?
            .expect("at least one rank");
            Ok(Payload::F32(sum))
        })?;
        let Payload::F32(sum) = &*r else {
            unreachable!("an f32 exchange")
        };
        tensors
            .iter()
            .zip(sum)
            .map(|(t, s)| {
                Ok(Tensor::from_slice(s, t.shape(), &Device::Cpu)?
                    .to_dtype(t.dtype())?
                    .to_device(t.device())?)
            })
            .collect()
    }

    fn all_reduce_f64(&mut self, values: &mut [f64]) -> Result<()> {
        let r = self.exchange(
            "all-reduce of values",
            Payload::F64(values.to_vec()),
            |parts| {
                check_parts(&parts, |p| match p {
                    Payload::F64(v) => vec![v.len()],
                    _ => vec![],
                })?;
                let per_rank = parts.into_iter().map(|p| match p {
                    Payload::F64(v) => v,
                    _ => unreachable!("checked"),
                });
                let sum = tree_sum(per_rank, |mut a: Vec<f64>, b: Vec<f64>| {
                    for (u, v) in a.iter_mut().zip(&b) {
                        *u += *v;
                    }
                    Ok::<_, DistError>(a)
                })?
                .expect("at least one rank");
                Ok(Payload::F64(sum))
            },
        )?;
        let Payload::F64(sum) = &*r else {
            unreachable!("an f64 exchange")
        };
        values.copy_from_slice(sum);
        Ok(())
    }

    fn broadcast_bytes(&mut self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        if root >= self.shared.world {
            return Err(DistError::Unsupported(format!(
                "broadcast from rank {root} in a world of {}",
                self.shared.world
            )));
        }
        let r = self.exchange("broadcast", Payload::Bytes(bytes.clone()), |mut parts| {
            check_parts(&parts, |_| vec![])?;
            Ok(parts.swap_remove(root))
        })?;
        let Payload::Bytes(b) = &*r else {
            unreachable!("a byte exchange")
        };
        bytes.clone_from(b);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", Payload::Unit, |parts| {
            check_parts(&parts, |_| vec![])?;
            Ok(Payload::Unit)
        })
        .map(|_| ())
    }

    fn abort(&mut self, reason: &str) {
        let mut st = self.lock();
        self.fail(&mut st, reason.to_string());
    }
}

impl Drop for ThreadGroup {
    /// A rank that goes away (at the end, on an error, or unwinding from a panic) makes the
    /// others' next call fail instead of waiting for it.
    fn drop(&mut self) {
        let mut st = self.lock();
        let reason = if std::thread::panicking() {
            "panicked"
        } else {
            "left the group"
        };
        self.fail(&mut st, reason.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T: Send + 'static>(
        world: usize,
        timeout_ms: u64,
        f: impl Fn(ThreadGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadGroup::new(world, Duration::from_millis(timeout_ms))
            .into_iter()
            .map(|g| {
                let f = f.clone();
                std::thread::spawn(move || f(g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sums_in_rank_order_and_repeats() {
        let out = run(4, 10_000, |mut g| {
            let r = g.rank() as f64;
            let mut results = Vec::new();
            for k in 0..50 {
                // Values whose sum depends on the order: the tree ((0+1)+(2+3)) is exact here.
                let mut v = [1e16 * (r - 1.5), r + k as f64];
                g.all_reduce_f64(&mut v).unwrap();
                results.push(v);
                let t = Tensor::new(&[r as f32, 1.0, 2.0 * r as f32], &Device::Cpu).unwrap();
                let s = g.all_reduce_sum(&[t]).unwrap();
                assert_eq!(s[0].to_vec1::<f32>().unwrap(), vec![6.0, 4.0, 12.0]);
            }
            let mut b = if g.rank() == 2 { vec![7u8, 8] } else { vec![] };
            g.broadcast_bytes(2, &mut b).unwrap();
            assert_eq!(b, vec![7, 8]);
            g.barrier().unwrap();
            results
        });
        for r in &out {
            assert_eq!(r, &out[0], "every rank reads the same sums");
        }
        let expect = (
            (1e16 * -1.5 + 1e16 * -0.5) + (1e16 * 0.5 + 1e16 * 1.5),
            6.0 + 4.0 * 7.0,
        );
        assert_eq!((out[0][7][0], out[0][7][1]), expect);
    }

    #[test]
    fn a_failing_rank_stops_the_others() {
        let out = run(3, 10_000, |mut g| {
            if g.rank() == 1 {
                g.abort("out of memory");
                return String::new();
            }
            g.barrier().unwrap_err().to_string()
        });
        assert_eq!(out[0], "rank 1 stopped: out of memory");
        assert_eq!(out[2], "rank 1 stopped: out of memory");
    }

    #[test]
    fn a_rank_that_leaves_or_panics_stops_the_others() {
        let out = run(2, 10_000, |mut g| {
            if g.rank() == 1 {
                drop(g);
                return String::new();
            }
            g.barrier().unwrap_err().to_string()
        });
        assert_eq!(out[0], "rank 1 stopped: left the group");
        let mut groups = ThreadGroup::new(2, Duration::from_secs(10));
        let g1 = groups.pop().unwrap();
        let mut g0 = groups.pop().unwrap();
        let t = std::thread::spawn(move || {
            let _g = g1;
            panic!("planted");
        });
        assert!(t.join().is_err());
        let e = g0.barrier().unwrap_err().to_string();
        assert_eq!(e, "rank 1 stopped: panicked");
    }

    #[test]
    fn a_missing_rank_times_out_by_name() {
        let out = run(3, 200, |mut g| {
            if g.rank() == 2 {
                std::thread::sleep(Duration::from_millis(600));
                return String::new();
            }
            let t0 = Instant::now();
            let e = g.barrier().unwrap_err().to_string();
            assert!(t0.elapsed() < Duration::from_secs(2));
            e
        });
        // The first to time out names rank 2; the other learns of it.
        assert!(
            out[..2]
                .iter()
                .any(|e| e.contains("rank(s) [2] did not arrive within 0.2 s")),
            "{out:?}"
        );
        assert!(out[..2].iter().all(|e| e.contains("[2]")), "{out:?}");
    }

    #[test]
    fn mismatched_calls_are_errors_naming_the_rank() {
        let out = run(2, 10_000, |mut g| {
            let mut v = vec![0.0; 1 + g.rank()];
            g.all_reduce_f64(&mut v).unwrap_err().to_string()
        });
        // Whichever rank combines the parts reports it; the other learns it from that rank.
        for e in &out {
            assert!(
                e.contains("rank 1: the size of a collective call differs from rank 0's"),
                "{out:?}"
            );
        }
    }
}
