//! The explicit training pass of the channels-last ResNet: a forward that keeps what each layer's
//! backward needs (a tape), and a hand-written backward through the trunk.
//!
//! Why not candle's autograd for the trunk: candle accumulates every gradient it propagates as
//! `zeros_like + add` (`GradStore::or_insert`), so each activation gradient costs a memset and an
//! extra read-read-write pass on top of the layer's own backward (about four extra passes over
//! every activation gradient of ResNet-50, all memory-bound); it also keeps every forward tensor
//! alive until the whole backward ends, and computes the input gradient of the first conv, which
//! nobody needs. The explicit backward hands each gradient straight to the next layer, adds only
//! where two paths meet (a block's input), frees each layer's saved tensors as soon as its
//! backward has run, and skips the stem's input gradient.
//!
//! Only the trunk is explicit: the pooled features become a fresh variable, and the classifier
//! and the loss (small, and whatever the caller computes) go through candle's autograd, whose
//! gradient for the features starts the explicit backward. The gradients of the weights land in
//! the same [`GradStore`] under the variables' ids, so callers see no difference.
//!
//! Channel attention (squeeze-excite, ECA) is explicit around a small graph of its own: the pool,
//! the gate's product with the activation and their gradients run as layer kernels, and only the
//! excitation (`[N, C]` tensors: the module's 1x1 convs or 1-D conv, ReLU, sigmoid) goes through
//! candle's autograd, from a fresh variable for the pooled input.
//!
//! Supported: every channels-last convolutional network here (ResNet, ResNeXt, ResNet-D and its
//! pooled shortcut, SE-ResNet, SENet, ECA-ResNet, RegNetY, EfficientNet and EfficientNetV2:
//! basic, bottleneck, inverted-residual and edge blocks, blocks with or without a residual and
//! with or without an activation after the add, ReLU or SiLU, any stem, with or without the
//! max-pool, a head conv, stochastic depth). The ViTs use the graph.

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, Var};

use super::{ActivationLayout, BatchNorm2d, Block, BlockAttn, Conv, Ctx, ResNet, Stem, Trunk};
use crate::model::drop_path_mask;
use crate::ops::nhwc::{self, AddReluSaved, BnSaved, ConvSaved, MaxPoolSaved};
use crate::ops::Activation;

/// How [`ResNet::forward_train_pass`] computes gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackwardMode {
    /// Explicit where it is supported and fast (channels-last: bf16 on CUDA, f32 through the
    /// CPU kernels), the graph elsewhere.
    #[default]
    Auto,
    /// candle's autograd over the whole network.
    Graph,
    /// The explicit trunk backward; an error for networks it does not support. Off the fast
    /// path (f64, NCHW weights in another dtype) it runs the slow reference backward (tests).
    Explicit,
}

impl std::str::FromStr for BackwardMode {
    type Err = String;

    /// `auto`, `graph` or `explicit`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackwardMode::Auto),
            "graph" => Ok(BackwardMode::Graph),
            "explicit" => Ok(BackwardMode::Explicit),
            other => Err(format!(
                "backward mode {other:?}: expected auto, graph or explicit"
            )),
        }
    }
}

/// One training forward whose backward is still to run: [`TrainPass::backward`] with the loss
/// computed from the logits [`ResNet::forward_train_pass`] returned.
#[must_use = "a training pass does nothing until its backward runs"]
pub struct TrainPass<'a> {
    inner: Inner<'a>,
}

enum Inner<'a> {
    Graph,
    Explicit {
        model: &'a ResNet,
        tape: Box<Tape>,
        features: Var,
    },
}

/// Called during a backward with the gradients computed so far, whenever more are final: a
/// data-parallel trainer takes them from the store and starts reducing them over the ranks while
/// the backward continues. An error stops the backward.
pub type GradHook<'h> = dyn FnMut(&mut GradStore) -> candle_core::Result<()> + 'h;

impl TrainPass<'_> {
    /// The gradients of `loss` (a scalar computed from this pass's logits) for every trainable
    /// variable of the network, as `loss.backward()` gives them.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        self.backward_hooked(loss, &mut |_| Ok(()))
    }

    /// [`TrainPass::backward`], handing the gradients to `hook` as they become final: the
    /// explicit backward calls it after the classifier and after each residual block and the
    /// stem (the gradients it has computed; the hook may take them out of the store), candle's
    /// graph once at the end. The store returned holds what the hook left.
    pub fn backward_hooked(self, loss: &Tensor, hook: &mut GradHook<'_>) -> Result<GradStore> {
        match self.inner {
            Inner::Graph => {
                let mut grads = loss.backward()?;
                hook(&mut grads)?;
                Ok(grads)
            }
            Inner::Explicit {
                model,
                tape,
                features,
            } => {
                let mut grads = loss.backward()?;
                let Some(d_features) = grads.remove(features.as_tensor()) else {
                    bail!("explicit backward: the loss does not depend on this pass's logits")
                };
                hook(&mut grads)?;
                model.backward_tape(*tape, &d_features, &mut grads, hook)?;
                Ok(grads)
            }
        }
    }

    /// True when the backward is the explicit one.
    pub fn is_explicit(&self) -> bool {
        matches!(self.inner, Inner::Explicit { .. })
    }
}

/// A conv followed by BatchNorm (+ ReLU, or + SiLU).
struct ConvBnTape {
    conv: ConvSaved,
    bn: BnSaved,
    /// The BatchNorm's output when a SiLU follows (its backward needs the input).
    silu_input: Option<Tensor>,
}

/// Channel attention: its input, the pooled input as the small graph's leaf, and the gate.
struct AttnTape {
    x: Tensor,
    pooled: Var,
    /// `[N, C]`, on the small graph.
    gate: Tensor,
}

/// How a block ends.
enum BlockOut {
    /// `relu(branch * scale + shortcut)` (ResNet, RegNet).
    AddRelu(AddReluSaved),
    /// `branch * scale + shortcut` (EfficientNet's residual blocks); the drop-path scales.
    Add(Option<Tensor>),
    /// The branch alone (EfficientNet's blocks that change shape).
    Branch,
}

struct BlockTape {
    branch: Vec<ConvBnTape>,
    attn: Option<AttnTape>,
    shortcut: Option<ConvBnTape>,
    /// The input of ResNet-D's shortcut pool.
    pool_input: Option<Tensor>,
    out: BlockOut,
}

struct Tape {
    /// The stem's conv-BN pairs in order; the last one's BN is `bn1`.
    stem: Vec<ConvBnTape>,
    /// The stem's max-pool (not RegNet's).
    pool: Option<MaxPoolSaved>,
    blocks: Vec<BlockTape>,
    /// EfficientNet's head conv-BN-SiLU.
    head: Option<ConvBnTape>,
    /// The input of the global average pool.
    trunk_out: Tensor,
}

/// The activation of a conv-BN pair: the network's (`silu`: SiLU, else ReLU) when `act`.
fn activation(act: bool, silu: bool) -> Activation {
    match (act, silu) {
        (false, _) => Activation::Identity,
        (true, false) => Activation::Relu,
        (true, true) => Activation::Silu,
    }
}

fn conv_bn(
    conv: &Conv,
    bn: &BatchNorm2d,
    x: &Tensor,
    act: Activation,
) -> Result<(Tensor, ConvBnTape)> {
    let (c, conv_t) = nhwc::conv2d_train(x, &conv.weight, conv.stride, conv.padding, conv.groups)?;
    let (y, bn_t) = nhwc::batch_norm_train(&c, bn, act == Activation::Relu)?;
    let (y, silu_input) = match act {
        Activation::Silu => (crate::ops::silu(&y)?, Some(y)),
        _ => (y, None),
    };
    let tape = ConvBnTape {
        conv: conv_t,
        bn: bn_t,
        silu_input,
    };
    Ok((y, tape))
}

/// Backward through a conv-BN pair; puts the weight, gamma and beta gradients in `grads` and
/// returns the input gradient when `need_dx`.
fn conv_bn_backward(
    t: ConvBnTape,
    conv: &Conv,
    bn: &BatchNorm2d,
    dy: &Tensor,
    need_dx: bool,
    grads: &mut GradStore,
) -> Result<Option<Tensor>> {
    let dy = match &t.silu_input {
        Some(x) => nhwc::silu_backward(x, dy)?,
        None => dy.clone(),
    };
    let (dc, dgamma, dbeta) = nhwc::batch_norm_backward(&t.bn, bn, &dy)?;
    drop(t.bn);
    grads.insert(bn.weight(), dgamma);
    grads.insert(bn.bias(), dbeta);
    let (dx, dw) = nhwc::conv2d_backward(&t.conv, &dc, need_dx)?;
    grads.insert(&conv.weight, dw);
    Ok(dx)
}

/// Channel attention's forward: the pool and the product as kernels, the gate on a small graph
/// from the pooled input.
fn attn_forward(attn: &BlockAttn, x: &Tensor, silu: bool) -> Result<(Tensor, AttnTape)> {
    let pooled = Var::from_tensor(&nhwc::global_avg_pool(x)?)?;
    let ctx = Ctx {
        train: true,
        drop_path_seed: None,
        nhwc: true,
        silu,
    };
    let gate = attn.gate_nhwc(pooled.as_tensor(), x.dtype(), ctx)?;
    let y = nhwc::channel_scale(x, &gate.detach())?;
    let tape = AttnTape {
        x: x.clone(),
        pooled,
        gate,
    };
    Ok((y, tape))
}

/// Channel attention's backward: the product's gradients as a kernel, the gate's gradient back
/// through the small graph (the module's weight gradients go into `grads`), and the pooled
/// input's gradient spread over the pixels and added to the product's.
fn attn_backward(
    attn: &BlockAttn,
    t: AttnTape,
    dy: &Tensor,
    grads: &mut GradStore,
) -> Result<Tensor> {
    let (dx, dgate) = nhwc::channel_scale_backward(&t.x, &t.gate.detach(), dy)?;
    let dgate = dgate.to_dtype(t.gate.dtype())?;
    let small = (&t.gate * &dgate)?.sum_all()?.backward()?;
    for w in attn.tensors() {
        if let Some(g) = small.get(w) {
            grads.insert(w, g.clone());
        }
    }
    let Some(dpooled) = small.get(t.pooled.as_tensor()) else {
        bail!("explicit backward: channel attention gave no gradient for its pooled input")
    };
    let dx_pool = nhwc::global_avg_pool_backward(&t.x, dpooled)?;
    nhwc::add(&dx, &dx_pool.to_dtype(dx.dtype())?)
}

impl Block {
    /// `silu`: the network's activation is SiLU (EfficientNet), else ReLU.
    fn forward_tape(
        &self,
        x: &Tensor,
        drop_path_seed: Option<u64>,
        silu: bool,
    ) -> Result<(Tensor, BlockTape)> {
        let mut ys = x.clone();
        let mut branch = Vec::with_capacity(self.branch.len());
        let mut attn = None;
        for (i, (conv, bn)) in self.branch.iter().enumerate() {
            let act = activation(i + 1 < self.branch.len(), silu);
            let (y, t) = conv_bn(conv, bn, &ys, act)?;
            branch.push(t);
            ys = y;
            if let (Some(a), true) = (&self.se, i == self.attn_after) {
                let (y, t) = attn_forward(a, &ys, silu)?;
                attn = Some(t);
                ys = y;
            }
        }
        if !self.residual {
            let tape = BlockTape {
                branch,
                attn,
                shortcut: None,
                pool_input: None,
                out: BlockOut::Branch,
            };
            return Ok((ys, tape));
        }
        let mask = if self.drop_prob > 0.0 {
            let Some(seed) = drop_path_seed else {
                bail!("resnet: a training forward with drop_path_rate > 0 needs a drop-path seed")
            };
            Some(drop_path_mask(&ys, self.drop_prob, seed, self.index)?)
        } else {
            None
        };
        let pool_input = match &self.downsample {
            Some(d) if d.avg_pool => Some(x.clone()),
            _ => None,
        };
        let (shortcut_out, shortcut) = match &self.downsample {
            Some(d) => {
                let pooled = match &pool_input {
                    Some(x) => nhwc::avg_pool2d_ceil(x)?,
                    None => x.clone(),
                };
                let (y, t) = conv_bn(&d.conv, &d.bn, &pooled, Activation::Identity)?;
                (y, Some(t))
            }
            None => (x.clone(), None),
        };
        let (out, out_t) = if self.act_after_add {
            // Stochastic depth's scaling is folded into the add.
            let (y, t) = nhwc::add_relu_train(&ys, &shortcut_out, mask.as_ref())?;
            (y, BlockOut::AddRelu(t))
        } else {
            let scaled = match &mask {
                Some(m) => ys.broadcast_mul(m)?,
                None => ys,
            };
            (nhwc::add(&scaled, &shortcut_out)?, BlockOut::Add(mask))
        };
        let tape = BlockTape {
            branch,
            attn,
            shortcut,
            pool_input,
            out: out_t,
        };
        Ok((out, tape))
    }

    fn backward_tape(&self, t: BlockTape, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let (d_branch, d_shortcut) = match t.out {
            BlockOut::AddRelu(saved) => {
                let (db, ds) = nhwc::add_relu_backward(&saved, dy)?;
                (db, Some(ds))
            }
            BlockOut::Add(Some(mask)) => (dy.broadcast_mul(&mask)?, Some(dy.clone())),
            BlockOut::Add(None) => (dy.clone(), Some(dy.clone())),
            BlockOut::Branch => (dy.clone(), None),
        };
        let misfit = || {
            candle_core::Error::Msg(format!(
                "explicit backward: block {} tape does not fit the block",
                self.index
            ))
        };
        let d_shortcut = match (&self.downsample, t.shortcut, d_shortcut) {
            (None, None, d_shortcut) => d_shortcut,
            (Some(d), Some(st), Some(d_shortcut)) => {
                let dp = conv_bn_backward(st, &d.conv, &d.bn, &d_shortcut, true, grads)?
                    .expect("need_dx gives dx");
                Some(match (d.avg_pool, &t.pool_input) {
                    (true, Some(x)) => nhwc::avg_pool2d_ceil_backward(x, &dp)?,
                    (false, None) => dp,
                    _ => return Err(misfit()),
                })
            }
            _ => return Err(misfit()),
        };
        let mut attn = t.attn;
        let mut d = d_branch;
        for (i, (lt, (conv, bn))) in t.branch.into_iter().zip(&self.branch).enumerate().rev() {
            if i == self.attn_after {
                match (&self.se, attn.take()) {
                    (Some(a), Some(at)) => d = attn_backward(a, at, &d, grads)?,
                    (None, None) => {}
                    _ => return Err(misfit()),
                }
            }
            d = conv_bn_backward(lt, conv, bn, &d, true, grads)?.expect("need_dx gives dx");
        }
        match d_shortcut {
            Some(ds) => nhwc::add(&d, &ds),
            None => Ok(d),
        }
    }
}

impl ResNet {
    /// How [`ResNet::forward_train_pass`] computes gradients ([`BackwardMode::Auto`] unless
    /// changed).
    pub fn backward_mode(&self) -> BackwardMode {
        self.backward
    }

    /// Chooses how [`ResNet::forward_train_pass`] computes gradients.
    pub fn set_backward_mode(&mut self, mode: BackwardMode) {
        self.backward = mode;
    }

    /// Why the explicit backward cannot run this network, if it cannot.
    pub fn explicit_backward_unsupported(&self) -> Option<&'static str> {
        if !matches!(self.trunk, Trunk::Conv(_)) {
            return Some("a Vision Transformer has no explicit backward");
        }
        if self.layout != ActivationLayout::Nhwc {
            return Some("it needs the channels-last layout");
        }
        None
    }

    /// A training forward (as [`ResNet::forward_train`]) whose backward is
    /// [`TrainPass::backward`]: explicit or candle's graph per [`ResNet::backward_mode`].
    ///
    /// ```ignore
    /// let (logits, pass) = model.forward_train_pass(&xs, seed)?;
    /// let loss = loss_fn.forward(&logits, targets)?;
    /// let grads = pass.backward(&loss)?;
    /// ```
    ///
    /// # Shapes
    /// - `xs`: in the model's layout, as [`ResNet::forward_train`]
    /// - returns logits `[N, num_classes]`
    pub fn forward_train_pass(
        &self,
        xs: &Tensor,
        drop_path_seed: u64,
    ) -> Result<(Tensor, TrainPass<'_>)> {
        let explicit = match self.backward {
            BackwardMode::Graph => false,
            BackwardMode::Auto => {
                self.explicit_backward_unsupported().is_none() && nhwc::is_fast(xs)
            }
            BackwardMode::Explicit => match self.explicit_backward_unsupported() {
                Some(why) => bail!("explicit backward: {why}"),
                None => true,
            },
        };
        if !explicit {
            let logits = self.forward_train(xs, drop_path_seed)?;
            return Ok((
                logits,
                TrainPass {
                    inner: Inner::Graph,
                },
            ));
        }
        let tape = self.forward_tape(xs, drop_path_seed)?;
        let pooled = nhwc::global_avg_pool(&tape.trunk_out)?.to_dtype(self.fc.weight().dtype())?;
        let features = Var::from_tensor(&pooled)?;
        let logits = candle_nn::Module::forward(&self.fc, features.as_tensor())?;
        let inner = Inner::Explicit {
            model: self,
            tape: Box::new(tape),
            features,
        };
        Ok((logits, TrainPass { inner }))
    }

    fn forward_tape(&self, xs: &Tensor, drop_path_seed: u64) -> Result<Tape> {
        let trunk = self.conv_trunk()?;
        let mut stem = Vec::new();
        let mut ys = xs.clone();
        let act = activation(true, trunk.silu);
        match &trunk.stem {
            Stem::Single(conv) => {
                let (y, t) = conv_bn(conv, &trunk.bn1, &ys, act)?;
                stem.push(t);
                ys = y;
            }
            Stem::Deep(pairs, last) => {
                for (conv, bn) in pairs {
                    let (y, t) = conv_bn(conv, bn, &ys, act)?;
                    stem.push(t);
                    ys = y;
                }
                let (y, t) = conv_bn(last, &trunk.bn1, &ys, act)?;
                stem.push(t);
                ys = y;
            }
        }
        let pool = if trunk.max_pool {
            let (y, p) = nhwc::max_pool_train(&ys, 3, 2, 1)?;
            ys = y;
            Some(p)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(trunk.blocks.len());
        for block in &trunk.blocks {
            let (y, t) = block.forward_tape(&ys, Some(drop_path_seed), trunk.silu)?;
            blocks.push(t);
            ys = y;
        }
        let head = match &trunk.head {
            Some((conv, bn)) => {
                let (y, t) = conv_bn(conv, bn, &ys, act)?;
                ys = y;
                Some(t)
            }
            None => None,
        };
        Ok(Tape {
            stem,
            pool,
            blocks,
            head,
            trunk_out: ys,
        })
    }

    fn backward_tape(
        &self,
        tape: Tape,
        d_features: &Tensor,
        grads: &mut GradStore,
        hook: &mut GradHook<'_>,
    ) -> Result<()> {
        let Tape {
            stem,
            pool,
            mut blocks,
            head,
            trunk_out,
        } = tape;
        let trunk = self.conv_trunk()?;
        let mut d = nhwc::global_avg_pool_backward(&trunk_out, d_features)?;
        drop(trunk_out);
        match (&trunk.head, head) {
            (Some((conv, bn)), Some(t)) => {
                d = conv_bn_backward(t, conv, bn, &d, true, grads)?.expect("need_dx gives dx");
            }
            (None, None) => {}
            _ => bail!("explicit backward: the tape's head does not fit the network"),
        }
        for block in trunk.blocks.iter().rev() {
            let Some(t) = blocks.pop() else {
                bail!("explicit backward: the tape has fewer blocks than the network")
            };
            d = block.backward_tape(t, &d, grads)?;
            // The block's weights are final.
            hook(grads)?;
        }
        if let Some(pool) = pool {
            d = nhwc::max_pool_backward(&pool, &d)?;
        }
        let layers: Vec<(&Conv, &BatchNorm2d)> = match &trunk.stem {
            Stem::Single(conv) => vec![(conv, &trunk.bn1)],
            Stem::Deep(pairs, last) => pairs
                .iter()
                .map(|(c, b)| (c, b))
                .chain([(last, &trunk.bn1)])
                .collect(),
        };
        if layers.len() != stem.len() {
            bail!("explicit backward: the tape's stem does not fit the network")
        }
        for (i, (t, (conv, bn))) in stem.into_iter().zip(layers).enumerate().rev() {
            // The image needs no gradient.
            match conv_bn_backward(t, conv, bn, &d, i > 0, grads)? {
                Some(dx) => d = dx,
                None => break,
            }
        }
        hook(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::BackwardMode;

    #[test]
    fn backward_modes_parse_by_name() {
        assert_eq!("auto".parse(), Ok(BackwardMode::Auto));
        assert_eq!("graph".parse(), Ok(BackwardMode::Graph));
        assert_eq!("explicit".parse(), Ok(BackwardMode::Explicit));
        let err = "Graph".parse::<BackwardMode>().unwrap_err();
        assert!(err.contains("expected auto, graph or explicit"), "{err}");
    }
}
