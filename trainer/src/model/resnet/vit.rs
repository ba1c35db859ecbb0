//! The Vision Transformers of timm v0.5.4 (`timm/models/vision_transformer.py`): ViT-Ti, ViT-S
//! and ViT-B with 16x16 patches, the Table 3 transformers of the RSB paper.
//!
//! A patch embedding (a `patch x patch` convolution with stride `patch`, computed here as one
//! matrix product over the flattened patches), a class token, a learned absolute position
//! embedding, `depth` pre-norm blocks (`x + drop_path(attn(norm1(x)))`, then
//! `x + drop_path(mlp(norm2(x)))`, LayerNorm eps 1e-6, exact-erf GELU, a bias on the qkv
//! projection), a final LayerNorm and a linear head on the class token. Tensor names are timm's:
//! `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.0.norm1`, `blocks.0.attn.qkv`,
//! `blocks.0.attn.proj`, `blocks.0.norm2`, `blocks.0.mlp.fc1`, `blocks.0.mlp.fc2`, `norm`,
//! `head`.
//!
//! The position embedding has the grid of [`VitConfig::img_size`]; an input of another size (any
//! multiple of the patch) gets the embedding resampled bicubically, as timm's `resize_pos_embed`
//! does when it loads weights (`F.interpolate(mode='bicubic', align_corners=False)`), written as
//! two fixed matrix products so that the gradient flows back to the stored grid. The trainer
//! builds the network at the recipe's training size (160 px under A3, a 10x10 grid) and tests it
//! at 224 px through this resampling; [`crate::checkpoint::load_weights`] resamples a stored
//! embedding of another grid (timm's released 224 px weights into a 160 px network).

use std::collections::HashSet;
use std::sync::Mutex;

use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{Builder, Ctx, NetConfig, ResNet, Trunk};
use crate::model::drop_path::{drop_path, drop_path_rates};
use crate::model::params::ParamKind;
use crate::model::ModelError;

/// LayerNorm epsilon of timm's ViT (`partial(nn.LayerNorm, eps=1e-6)`).
const LN_EPS: f64 = 1e-6;

/// A Vision Transformer's architecture (timm's `VisionTransformer` arguments).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// The input size the position embedding is laid out for (`img_size / patch_size` patches a
    /// side); other sizes resample it.
    pub img_size: usize,
    /// Side of the square patches.
    pub patch_size: usize,
    /// Token width.
    pub embed_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads per block (`embed_dim` must be a multiple).
    pub num_heads: usize,
    /// MLP hidden width as a multiple of `embed_dim` (timm: `int(dim * mlp_ratio)`).
    pub mlp_ratio: f64,
    /// A bias on the qkv projection (timm's default, true).
    pub qkv_bias: bool,
    /// Classifier outputs.
    pub num_classes: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Stochastic depth of the last block; a linear ramp from 0 at the first.
    pub drop_path_rate: f64,
}

impl VitConfig {
    /// The names [`VitConfig::by_name`] accepts: ViT-Ti/16, ViT-S/16 and ViT-B/16 of the paper's
    /// Table 3.
    pub const NAMES: &'static [&'static str] = &[
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
    ];

    fn patch16(embed_dim: usize, num_heads: usize) -> Self {
        VitConfig {
            img_size: 224,
            patch_size: 16,
            embed_dim,
            depth: 12,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            num_classes: 1000,
            in_chans: 3,
            drop_path_rate: 0.0,
        }
    }

    /// timm v0.5.4's model function `name` (224 px, 1000 classes, no stochastic depth).
    pub fn by_name(name: &str) -> std::result::Result<Self, ModelError> {
        Ok(match name {
            "vit_tiny_patch16_224" => Self::patch16(192, 3),
            "vit_small_patch16_224" => Self::patch16(384, 6),
            "vit_base_patch16_224" => Self::patch16(768, 12),
            _ => {
                return Err(ModelError::UnknownModel {
                    name: name.to_string(),
                    known: Self::NAMES.to_vec(),
                })
            }
        })
    }

    /// Patches a side at [`VitConfig::img_size`].
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// MLP hidden width.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        super::check_head_and_depth("vit", self.num_classes, self.in_chans, self.drop_path_rate)?;
        if self.patch_size == 0 || self.img_size < self.patch_size {
            bail!(
                "vit: img_size {} must be at least one patch of {}",
                self.img_size,
                self.patch_size
            )
        }
        if !self.img_size.is_multiple_of(self.patch_size) {
            bail!(
                "vit: img_size {} is not a multiple of the patch size {}",
                self.img_size,
                self.patch_size
            )
        }
        if self.depth == 0 || self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads)
        {
            bail!(
                "vit: needs depth > 0 and embed_dim {} a multiple of num_heads {}",
                self.embed_dim,
                self.num_heads
            )
        }
        if self.mlp_hidden() == 0 {
            bail!("vit: mlp_ratio {} gives no hidden units", self.mlp_ratio)
        }
        Ok(())
    }

    /// Builds the network from `vb`, whose tensors are named as timm's `state_dict`.
    pub fn build(&self, vb: VarBuilder) -> Result<ResNet> {
        ResNet::new_vit(self, vb)
    }
}

/// A linear layer `y = x W^T + b` over the last dimension of any input.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(
        b: &mut Builder,
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = b.get(vb, &[c_out, c_in], "weight", ParamKind::TruncNormal02)?;
        let bias = if bias {
            Some(b.get(vb, &[c_out], "bias", ParamKind::ZeroBias)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// # Shapes
    /// - `xs`: `[..., c_in]` in the compute dtype
    /// - returns `[..., c_out]`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let c_in = dims[dims.len() - 1];
        let rows = xs.elem_count() / c_in.max(1);
        let w = cast(&self.weight, xs.dtype())?;
        let mut ys = xs.reshape((rows, c_in))?.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            ys = ys.broadcast_add(&cast(b, xs.dtype())?)?;
        }
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        ys.reshape(out)
    }
}

/// PyTorch's `nn.LayerNorm` over the last dimension (biased variance), computed in f32 or f64
/// whatever the input dtype.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(b: &mut Builder, vb: &VarBuilder, dim: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: b.get(vb, &[dim], "weight", ParamKind::LnWeight)?,
            bias: b.get(vb, &[dim], "bias", ParamKind::LnBias)?,
        })
    }

    /// In f32 (f64 for f64 input) whatever the input dtype, returned in the input dtype
    /// ([`crate::ops::layer_norm`]).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(xs, &self.weight, &self.bias, LN_EPS)
    }
}

/// `t` in `dtype` (itself when it already is).
fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// One pre-norm transformer block.
#[derive(Debug)]
struct VitBlock {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    drop_prob: f64,
    index: usize,
}

impl VitBlock {
    /// Multi-head self-attention of `xs` `[N, T, D]`.
    fn attention(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, t, d) = xs.dims3()?;
        let (h, dh) = (self.num_heads, d / self.num_heads);
        // [N, T, 3, H, dh] -> [3, N, H, T, dh]
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((n, t, 3, h, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let attn = crate::ops::softmax_last_dim(&scores)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((n, t, d))?;
        self.proj.forward(&out)
    }

    fn mlp(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&crate::ops::gelu(&self.fc1.forward(xs)?)?)
    }

    /// The residual branch `ys` after stochastic depth: timm's block applies its one `DropPath`
    /// twice, drawing a fresh mask each time; here the attention branch of block `b` draws
    /// stream `2b` and the MLP branch `2b + 1`.
    fn drop(&self, ys: Tensor, ctx: Ctx, branch: usize) -> Result<Tensor> {
        if !ctx.train || self.drop_prob <= 0.0 {
            return Ok(ys);
        }
        let Some(seed) = ctx.drop_path_seed else {
            bail!(
                "vit block {}: stochastic depth needs a seed (ResNet::set_drop_path_seed)",
                self.index
            )
        };
        drop_path(&ys, self.drop_prob, seed, 2 * self.index + branch)
    }

    fn forward(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let a = self.attention(&self.norm1.forward(xs)?)?;
        let xs = (xs + self.drop(a, ctx, 0)?)?;
        let m = self.mlp(&self.norm2.forward(&xs)?)?;
        &xs + self.drop(m, ctx, 1)?
    }
}

/// Patch embedding, tokens and blocks of a Vision Transformer.
#[derive(Debug)]
pub(super) struct VitTrunk {
    /// `[D, C, p, p]`, timm's `patch_embed.proj.weight`.
    patch_weight: Tensor,
    patch_bias: Tensor,
    patch: usize,
    /// `[1, 1, D]`.
    cls_token: Tensor,
    /// `[1, 1 + grid², D]`.
    pos_embed: Tensor,
    grid: usize,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    /// Grids the position embedding has been resampled to (each is logged once).
    resampled: Mutex<HashSet<(usize, usize)>>,
}

impl VitTrunk {
    /// The class token's features after the final norm, `[N, D]` in the compute dtype: the input
    /// dtype when it is bf16 or f16 (the weights are cast to it; norms and softmax run in f32),
    /// else the weights' dtype.
    ///
    /// # Shapes
    /// - `xs`: `[N, C, H, W]` (or `[N, H, W, C]` in the channels-last layout), `H` and `W`
    ///   multiples of the patch size
    pub(super) fn features(&self, xs: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let dtype = match xs.dtype() {
            DType::BF16 | DType::F16 => xs.dtype(),
            _ => self.patch_weight.dtype(),
        };
        let xs = cast(xs, dtype)?;
        let p = self.patch;
        let (n, c, h, w) = if ctx.nhwc {
            let (n, h, w, c) = xs.dims4()?;
            (n, c, h, w)
        } else {
            xs.dims4()?
        };
        let d = self.patch_weight.dim(0)?;
        if c != self.patch_weight.dim(1)? {
            bail!(
                "vit: input has {c} channels, the patch embedding expects {}",
                self.patch_weight.dim(1)?
            )
        }
        if h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            bail!("vit: input {h}x{w} is not a multiple of the patch size {p}")
        }
        let (gh, gw) = (h / p, w / p);
        // Patches as rows of (c, ky, kx), the order of the conv kernel's elements.
        let patches = if ctx.nhwc {
            xs.reshape((n, gh, p, gw, p, c))?
                .permute((0, 1, 3, 5, 2, 4))?
        } else {
            xs.reshape((n, c, gh, p, gw, p))?
                .permute((0, 2, 4, 1, 3, 5))?
        };
        let patches = patches.contiguous()?.reshape((n * gh * gw, c * p * p))?;
        let kernel = cast(&self.patch_weight, dtype)?.reshape((d, c * p * p))?;
        let tokens = patches
            .matmul(&kernel.t()?)?
            .broadcast_add(&cast(&self.patch_bias, dtype)?)?
            .reshape((n, gh * gw, d))?;
        let cls = cast(&self.cls_token, dtype)?
            .broadcast_as((n, 1, d))?
            .contiguous()?;
        let pos = cast(&self.pos_embed_for(gh, gw)?, dtype)?;
        let mut xs = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&pos)?;
        for block in &self.blocks {
            xs = block.forward(&xs, ctx)?;
        }
        self.norm.forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// The position embedding for a `gh x gw` grid: the stored one, or resampled (logged once
    /// per grid).
    fn pos_embed_for(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if (gh, gw) == (self.grid, self.grid) {
            return Ok(self.pos_embed.clone());
        }
        let mut seen = self.resampled.lock().unwrap_or_else(|e| e.into_inner());
        if seen.insert((gh, gw)) {
            eprintln!(
                "vit: position embedding resampled (bicubic) from a {g}x{g} grid to {gh}x{gw} \
                 for {h}x{w} px input",
                g = self.grid,
                h = gh * self.patch,
                w = gw * self.patch
            );
        }
        resample_pos_embed(&self.pos_embed, (self.grid, self.grid), (gh, gw), 1)
    }
}

/// PyTorch's bicubic interpolation (`align_corners=False`, cubic coefficient -0.75, edge
/// indices clamped, as `F.interpolate(mode='bicubic')` without antialiasing) from `len_in` to
/// `len_out` samples, as a `len_out x len_in` matrix (row `i` holds the weights of output `i`).
pub fn bicubic_matrix(len_out: usize, len_in: usize) -> Vec<f64> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = len_in as f64 / len_out as f64;
    let last = len_in as i64 - 1;
    let mut m = vec![0.0; len_out * len_in];
    for i in 0..len_out {
        let src = scale * (i as f64 + 0.5) - 0.5;
        // PyTorch's `guard_index_and_lambda`: the index capped above only.
        let base = (src.floor() as i64).min(last);
        let t = (src - base as f64).clamp(0.0, 1.0);
        let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in weights.into_iter().enumerate() {
            let j = (base - 1 + k as i64).clamp(0, last) as usize;
            m[i * len_in + j] += wk;
        }
    }
    m
}

/// timm's `resize_pos_embed`: the first `num_tokens` tokens of `pos` `[1, T, D]` kept, the rest
/// (a `from.0 x from.1` grid, row-major) resampled bicubically to `to.0 x to.1`. Differentiable
/// (two matrix products).
pub fn resample_pos_embed(
    pos: &Tensor,
    from: (usize, usize),
    to: (usize, usize),
    num_tokens: usize,
) -> Result<Tensor> {
    let (one, tokens, d) = pos.dims3()?;
    let (fh, fw) = from;
    let (th, tw) = to;
    if one != 1 || tokens != num_tokens + fh * fw {
        bail!(
            "position embedding of shape {:?} is not {num_tokens} tokens and a {fh}x{fw} grid",
            pos.dims()
        )
    }
    let dev = pos.device();
    let rows = Tensor::from_vec(bicubic_matrix(th, fh), (th, fh), dev)?.to_dtype(pos.dtype())?;
    let cols = Tensor::from_vec(bicubic_matrix(tw, fw), (tw, fw), dev)?.to_dtype(pos.dtype())?;
    let grid = pos.narrow(1, num_tokens, fh * fw)?.reshape((fh, fw * d))?;
    // Along the height: [th, fh] x [fh, fw * D].
    let grid = rows.matmul(&grid)?.reshape((th, fw, d))?;
    // Along the width, per output row: [tw, fw] x [fw, D].
    let grid = cols
        .unsqueeze(0)?
        .broadcast_as((th, tw, fw))?
        .contiguous()?
        .matmul(&grid)?
        .reshape((1, th * tw, d))?;
    Tensor::cat(&[&pos.narrow(1, 0, num_tokens)?, &grid], 1)
}

impl ResNet {
    fn new_vit(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut b = Builder {
            params: Vec::new(),
            goog_init: false,
        };
        let (d, p, g) = (cfg.embed_dim, cfg.patch_size, cfg.grid());
        let cls_token = b.get(&vb, &[1, 1, d], "cls_token", ParamKind::TruncNormal02)?;
        let pos_embed = b.get(
            &vb,
            &[1, 1 + g * g, d],
            "pos_embed",
            ParamKind::TruncNormal02,
        )?;
        let vp = vb.pp("patch_embed").pp("proj");
        let fan_in = cfg.in_chans * p * p;
        let patch_weight = b.get(
            &vp,
            &[d, cfg.in_chans, p, p],
            "weight",
            ParamKind::ConvWeightDefault { fan_in },
        )?;
        let patch_bias = b.get(&vp, &[d], "bias", ParamKind::ConvBias { fan_in })?;
        let drop_probs = drop_path_rates(cfg.drop_path_rate, cfg.depth);
        let hidden = cfg.mlp_hidden();
        let mut blocks = Vec::with_capacity(cfg.depth);
        for (index, &drop_prob) in drop_probs.iter().enumerate() {
            let vs = vb.pp("blocks").pp(index);
            let norm1 = LayerNorm::new(&mut b, &vs.pp("norm1"), d)?;
            let qkv = Linear::new(&mut b, &vs.pp("attn").pp("qkv"), d, 3 * d, cfg.qkv_bias)?;
            let proj = Linear::new(&mut b, &vs.pp("attn").pp("proj"), d, d, true)?;
            let norm2 = LayerNorm::new(&mut b, &vs.pp("norm2"), d)?;
            let fc1 = Linear::new(&mut b, &vs.pp("mlp").pp("fc1"), d, hidden, true)?;
            let fc2 = Linear::new(&mut b, &vs.pp("mlp").pp("fc2"), hidden, d, true)?;
            blocks.push(VitBlock {
                norm1,
                qkv,
                proj,
                norm2,
                fc1,
                fc2,
                num_heads: cfg.num_heads,
                drop_prob,
                index,
            });
        }
        let norm = LayerNorm::new(&mut b, &vb.pp("norm"), d)?;
        // timm 0.5.4 inits with `self.apply(_init_vit_weights)`, which passes no module name:
        // the head gets the same trunc_normal(.02) weights and zero bias as every linear.
        let head = Linear::new(&mut b, &vb.pp("head"), d, cfg.num_classes, true)?;
        let bias = head.bias.clone();
        Ok(ResNet::assemble(
            NetConfig::Vit(cfg.clone()),
            Trunk::Vit(VitTrunk {
                patch_weight,
                patch_bias,
                patch: p,
                cls_token,
                pos_embed,
                grid: g,
                blocks,
                norm,
                resampled: Mutex::new(HashSet::new()),
            }),
            candle_nn::Linear::new(head.weight, bias),
            b.params,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bicubic_rows_sum_to_one_and_identity_is_exact() {
        for (o, i) in [(6, 4), (3, 4), (14, 10), (10, 14), (7, 7)] {
            let m = bicubic_matrix(o, i);
            for r in 0..o {
                let s: f64 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{o}x{i} row {r}: {s}");
            }
        }
        let m = bicubic_matrix(5, 5);
        for r in 0..5 {
            for c in 0..5 {
                assert_eq!(m[r * 5 + c], if r == c { 1.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn resampling_keeps_the_class_token_and_a_constant_grid() -> Result<()> {
        let dev = Device::Cpu;
        let cls = Tensor::new(&[[[5.0f64, -1.0]]], &dev)?;
        let grid = Tensor::ones((1, 9, 2), DType::F64, &dev)?;
        let pos = Tensor::cat(&[&cls, &grid], 1)?;
        let out = resample_pos_embed(&pos, (3, 3), (4, 5), 1)?;
        assert_eq!(out.dims(), [1, 21, 2]);
        let v = out.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(&v[..2], &[5.0, -1.0]);
        assert!(v[2..].iter().all(|x| (x - 1.0).abs() < 1e-12), "{v:?}");
        assert!(resample_pos_embed(&pos, (2, 2), (4, 4), 1).is_err());
        Ok(())
    }

    #[test]
    fn names_and_validation() {
        let s = VitConfig::by_name("vit_small_patch16_224").unwrap();
        assert_eq!(
            (s.embed_dim, s.num_heads, s.depth, s.grid()),
            (384, 6, 12, 14)
        );
        assert_eq!(s.mlp_hidden(), 1536);
        assert!(VitConfig::by_name("vit_huge").is_err());
        let bad = VitConfig {
            img_size: 100,
            ..s.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("multiple"));
    }

    /// The channels-last input path (patches gathered from `[N, H, W, C]`) gives the NCHW
    /// path's logits and gradients.
    #[test]
    fn channels_last_input_equals_nchw() -> Result<()> {
        let cfg = VitConfig {
            img_size: 8,
            patch_size: 4,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            num_classes: 5,
            drop_path_rate: 0.3,
            ..VitConfig::by_name("vit_tiny_patch16_224").unwrap()
        };
        let varmap = candle_nn::VarMap::new();
        let mut model = NetConfig::from(cfg).build_seeded(&varmap, 3, DType::F64, &Device::Cpu)?;
        let xs = Tensor::randn(0f64, 1.0, (3, 3, 12, 8), &Device::Cpu)?;
        let run = |m: &ResNet, x: &Tensor| -> Result<(Vec<f64>, Vec<f64>)> {
            let logits = m.forward_train(x, 11)?;
            let grads = logits.sqr()?.sum_all()?.backward()?;
            let g = grads
                .get(&m.params()[1].tensor)
                .expect("pos_embed has a gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            Ok((logits.flatten_all()?.to_vec1::<f64>()?, g))
        };
        let a = run(&model, &xs)?;
        model.set_layout(crate::model::ActivationLayout::Nhwc);
        let b = run(&model, &xs.permute((0, 2, 3, 1))?.contiguous()?)?;
        for (x, y) in a.0.iter().zip(&b.0).chain(a.1.iter().zip(&b.1)) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        Ok(())
    }
}
