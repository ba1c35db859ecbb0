//! Gradients of an update: summed over the micro-batches of a rank, then over the ranks, the
//! latter in buckets that start while the last micro-batch's backward is still running.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::dist::{Collective, PendingSum, TreeSum};

/// Sums the gradients of the trainable variables over micro-batches, keeping nothing else of
/// each backward pass (the activations' gradients are dropped as soon as a micro-batch is done).
///
/// Each variable's sum is a [`TreeSum`] over micro-batches (in order), so W ranks summing A
/// micro-batches each, then their totals, add exactly as one rank summing W x A does (for powers
/// of two; see [`crate::dist`]). It holds at most `log2(A) + 1` partial sums per variable.
///
/// With each micro-batch loss divided by the number of micro-batches (over all ranks), the sum
/// is the gradient of the mean loss over the whole batch (exactly so for a network without
/// BatchNorm).
pub struct GradAccumulator {
    vars: Vec<Var>,
    trees: Vec<TreeSum<Option<Tensor>>>,
}

fn add_opt(a: Option<Tensor>, b: Option<Tensor>) -> candle_core::Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(x), Some(y)) => Some((x + y)?),
        (x, None) => x,
        (None, y) => y,
    })
}

impl GradAccumulator {
    /// An empty sum over `vars`.
    pub fn new(vars: &[(String, Var)]) -> Self {
        GradAccumulator {
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            trees: vars.iter().map(|_| TreeSum::new()).collect(),
        }
    }

    /// Adds one backward pass's gradients of the variables.
    pub fn add(&mut self, mut grads: GradStore) -> candle_core::Result<()> {
        for (v, tree) in self.vars.iter().zip(&mut self.trees) {
            tree.push(grads.remove(v.as_tensor()), add_opt)?;
        }
        Ok(())
    }

    /// Variable `i`'s sum with `last` (its gradient of the last micro-batch) added: the same
    /// additions as [`GradAccumulator::add`] of that micro-batch and then the total. Takes the
    /// variable's partial sums.
    fn finish_var(
        &mut self,
        i: usize,
        last: Option<Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut tree = std::mem::take(&mut self.trees[i]);
        tree.push(last, add_opt)?;
        Ok(tree.finish(add_opt)?.flatten())
    }

    /// The sums, in the order of the variables (`None` for a variable without gradient).
    pub fn into_sums(mut self) -> candle_core::Result<(Vec<Var>, Vec<Option<Tensor>>)> {
        let trees = std::mem::take(&mut self.trees);
        let sums = trees
            .into_iter()
            .map(|t| Ok(t.finish(add_opt)?.flatten()))
            .collect::<candle_core::Result<_>>()?;
        Ok((self.vars, sums))
    }

    /// The sums as a gradient store for [`crate::optim::TrainOptimizer::queue_step`].
    pub fn into_store(self) -> candle_core::Result<GradStore> {
        let (vars, sums) = self.into_sums()?;
        Ok(store(&vars, sums))
    }
}

fn store(vars: &[Var], sums: Vec<Option<Tensor>>) -> GradStore {
    let mut ids: HashMap<TensorId, Tensor> = HashMap::new();
    for (v, g) in vars.iter().zip(sums) {
        if let Some(g) = g {
            ids.insert(v.as_tensor().id(), g);
        }
    }
    let mut store = GradStore::default();
    for (id, g) in ids {
        store.insert_id(id, g);
    }
    store
}

/// Bytes of gradients per all-reduce call (PyTorch DDP's default bucket, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// The rank's summed gradients, summed over all ranks of `comm` after the backward (the
/// non-overlapped form of [`BucketReducer`]): in buckets of about [`BUCKET_BYTES`], last
/// variables first. Every rank must have gradients for the same variables.
pub fn all_reduce(
    acc: GradAccumulator,
    comm: &mut dyn Collective,
) -> crate::train::Result<GradStore> {
    BucketReducer::new(acc, comm, BUCKET_BYTES).finish_with(GradStore::default(), true)
}

/// The reduction of an update's gradients over the ranks, overlapped with the last
/// micro-batch's backward: the backward calls [`BucketReducer::ready`] whenever some gradients
/// are final (after each residual block of the explicit backward); each final gradient gets the
/// rank's earlier micro-batches added, joins the open bucket, and a full bucket's sum is started
/// on the collective ([`Collective::start_sum`]: on a GPU on NCCL's own stream, while the
/// backward continues). [`BucketReducer::finish`] starts the last bucket and waits for all.
///
/// Every rank sees the same gradients become final in the same order (the same network and
/// backward), so the buckets are the same on every rank. Sums are element-wise, so the bucket
/// boundaries do not change the results of the host collectives.
pub struct BucketReducer<'c> {
    acc: GradAccumulator,
    comm: &'c mut dyn Collective,
    bucket_bytes: usize,
    done: Vec<bool>,
    open: Vec<(usize, Tensor)>,
    open_bytes: usize,
    started: Vec<(Vec<usize>, Box<dyn PendingSum>)>,
    /// Buckets started before the backward ended (the overlapped ones), for logs and tests.
    pub buckets_during_backward: usize,
}

impl<'c> BucketReducer<'c> {
    /// A reduction of `acc` (the rank's micro-batches but the last) over `comm`, in buckets of
    /// about `bucket_bytes`.
    pub fn new(acc: GradAccumulator, comm: &'c mut dyn Collective, bucket_bytes: usize) -> Self {
        let n = acc.vars.len();
        BucketReducer {
            acc,
            comm,
            bucket_bytes: bucket_bytes.max(1),
            done: vec![false; n],
            open: Vec::new(),
            open_bytes: 0,
            started: Vec::new(),
            buckets_during_backward: 0,
        }
    }

    /// Takes every gradient of a trainable variable from `grads` (the last micro-batch's; final
    /// ones, since a backward hands each variable's gradient over once), last variables first.
    pub fn ready(&mut self, grads: &mut GradStore) -> crate::train::Result<()> {
        self.take(grads, false)
    }

    fn take(&mut self, grads: &mut GradStore, at_end: bool) -> crate::train::Result<()> {
        for i in (0..self.done.len()).rev() {
            if self.done[i] {
                continue;
            }
            let Some(g) = grads.remove(self.acc.vars[i].as_tensor()) else {
                continue;
            };
            self.done[i] = true;
            if let Some(total) = self.acc.finish_var(i, Some(g))? {
                self.push(i, total, at_end)?;
            }
        }
        Ok(())
    }

    fn push(&mut self, i: usize, total: Tensor, at_end: bool) -> crate::train::Result<()> {
        self.open_bytes += total.elem_count() * total.dtype().size_in_bytes();
        self.open.push((i, total));
        if self.open_bytes >= self.bucket_bytes {
            self.start(at_end)?;
        }
        Ok(())
    }

    fn start(&mut self, at_end: bool) -> crate::train::Result<()> {
        if self.open.is_empty() {
            return Ok(());
        }
        let (idx, tensors): (Vec<usize>, Vec<Tensor>) =
            std::mem::take(&mut self.open).into_iter().unzip();
        self.open_bytes = 0;
        let pending = self.comm.start_sum(&tensors)?;
        self.started.push((idx, pending));
        if !at_end {
            self.buckets_during_backward += 1;
        }
        Ok(())
    }

    /// The reduced gradients: `rest` (what the backward returned, with anything
    /// [`BucketReducer::ready`] did not take) goes in, the variables without a last gradient get
    /// their earlier sum, the last bucket is started, and every sum is waited for.
    pub fn finish(self, rest: GradStore) -> crate::train::Result<GradStore> {
        self.finish_with(rest, false)
    }

    fn finish_with(mut self, mut rest: GradStore, whole: bool) -> crate::train::Result<GradStore> {
        self.take(&mut rest, true)?;
        for i in (0..self.done.len()).rev() {
            if !self.done[i] {
                self.done[i] = true;
                if let Some(total) = self.acc.finish_var(i, None)? {
                    self.push(i, total, true)?;
                }
            }
        }
        self.start(true)?;
        if whole {
            self.buckets_during_backward = 0;
        }
        let mut sums: Vec<Option<Tensor>> = vec![None; self.done.len()];
        for (idx, pending) in std::mem::take(&mut self.started) {
            for (i, t) in idx.into_iter().zip(pending.wait()?) {
                sums[i] = Some(t);
            }
        }
        Ok(store(&self.acc.vars, sums))
    }
}
