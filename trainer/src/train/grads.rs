//! Gradients of an update: summed over the micro-batches of a rank, then over the ranks.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::dist::{Collective, TreeSum};

/// Sums the gradients of the trainable variables over micro-batches, keeping nothing else of
/// each backward pass (the activations' gradients are dropped as soon as a micro-batch is done).
///
/// The sum is a [`TreeSum`] over micro-batches (in order), so W ranks summing A micro-batches
/// each, then their totals, add exactly as one rank summing W x A does (for powers of two; see
/// [`crate::dist`]). It holds at most `log2(A) + 1` partial sums.
///
/// With each micro-batch loss divided by the number of micro-batches (over all ranks), the sum
/// is the gradient of the mean loss over the whole batch (exactly so for a network without
/// BatchNorm).
pub struct GradAccumulator {
    vars: Vec<Var>,
    tree: TreeSum<Vec<Option<Tensor>>>,
}

fn add_sets(
    a: Vec<Option<Tensor>>,
    b: Vec<Option<Tensor>>,
) -> candle_core::Result<Vec<Option<Tensor>>> {
    a.into_iter()
        .zip(b)
        .map(|pair| {
            Ok(match pair {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, None) => x,
                (None, y) => y,
            })
        })
        .collect()
}

impl GradAccumulator {
    /// An empty sum over `vars`.
    pub fn new(vars: &[(String, Var)]) -> Self {
        GradAccumulator {
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            tree: TreeSum::new(),
        }
    }

    /// Adds one backward pass's gradients of the variables.
    pub fn add(&mut self, mut grads: GradStore) -> candle_core::Result<()> {
        let set: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.remove(v.as_tensor()))
            .collect();
        self.tree.push(set, add_sets)
    }

    /// The sums, in the order of the variables (`None` for a variable without gradient).
    pub fn into_sums(self) -> candle_core::Result<(Vec<Var>, Vec<Option<Tensor>>)> {
        let n = self.vars.len();
        let sums = self.tree.finish(add_sets)?.unwrap_or_else(|| vec![None; n]);
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

/// The rank's summed gradients, summed over all ranks of `comm`: in buckets of about
/// [`BUCKET_BYTES`], last variables first (the order a backward pass finishes them, so a device
/// collective can start on the first bucket while later ones are still being gathered). Every
/// rank must have gradients for the same variables.
pub fn all_reduce(
    acc: GradAccumulator,
    comm: &mut dyn Collective,
) -> crate::train::Result<GradStore> {
    let (vars, mut sums) = acc.into_sums()?;
    if comm.world_size() > 1 {
        let present: Vec<usize> = (0..sums.len())
            .rev()
            .filter(|&i| sums[i].is_some())
            .collect();
        let mut start = 0;
        while start < present.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < present.len() && (end == start || bytes < BUCKET_BYTES) {
                let t = sums[present[end]].as_ref().expect("present");
                bytes += t.elem_count() * t.dtype().size_in_bytes();
                end += 1;
            }
            let bucket: Vec<Tensor> = present[start..end]
                .iter()
                .map(|&i| sums[i].take().expect("present"))
                .collect();
            let reduced = comm.all_reduce_sum(&bucket)?;
            for (&i, t) in present[start..end].iter().zip(reduced) {
                sums[i] = Some(t);
            }
            start = end;
        }
    }
    Ok(store(&vars, sums))
}
