"""Golden data for trainer/tests/resnet_golden.rs, from timm 0.5.4 (torch 2.5.1 CPU, float32).

Run from the repository root with torch 2.5.1 and timm 0.5.4 (scripts/bench-cpu-vs-torch.sh
installs them into .venv-torch):
    .venv-torch/bin/python trainer/tests/golden/resnet_golden.py
It writes, next to this script:
  resnet_keys.json       state_dict keys and shapes of every model name the trainer knows
                         (resnet.py's, regnet.py's, efficientnet.py's and
                         vision_transformer.py's)
  resnet_drop_path.json  per-block drop_prob of timm's DropPath at drop_path_rate=0.05, and a
                         float64 train forward of seresnet50 at drop_path_rate=0.5 whose DropPath
                         modules apply the trainer's masks (loader::rng, ported below)
  model_data.json        each name's data settings in timm's default_cfg (input_size,
                         test_input_size, crop_pct, interpolation)
  resnet_forward.json    eval logits, train logits, running stats after the train forward and
                         per-parameter gradient L2 norms, with weights from a hash formula, in
                         float32 and in float64 (same float32-rounded weights and input)

Weights, input and loss coefficients come from `hashed(name, shape)`: element i of tensor `name`
is 2*u - 1 with u = splitmix64_finalizer(fnv1a64(name) + (i + 1) * 0x9E3779B97F4A7C15) >> 11
scaled by 2^-53, times a per-kind scale. All integer arithmetic is mod 2^64, so the Rust test
reproduces every value bit for bit.
"""
import json
import math
import os

import numpy as np
import timm
import torch

OUT = os.path.dirname(os.path.abspath(__file__))
NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d", "seresnet50",
         "resnext50_32x4d", "ecaresnet50t", "ecaresnet269d", "senet154",
         "regnety_002", "regnety_040", "regnety_080", "regnety_160", "regnety_320",
         "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
         "efficientnet_b4", "efficientnetv2_rw_s", "efficientnetv2_rw_m",
         "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
# "NAME@1111": timm's NAME with one block per stage (ResNet built from the same arguments as
# timm's `NAME` function in resnet.py, but layers=[1, 1, 1, 1]), for the deep networks whose
# full forward would make the test slow; their full key lists are in resnet_keys.json.
FORWARD_NAMES = ["resnet18", "resnet50", "resnet50d", "seresnet50", "resnext50_32x4d",
                 "ecaresnet50t", "ecaresnet269d@1111", "senet154@1111", "regnety_002",
                 "regnety_040", "efficientnet_b0", "efficientnet_b2", "efficientnetv2_rw_s"]
# The arguments of timm 0.5.4's resnet.py model functions, for the "@1111" variants.
SHALLOW_ARGS = {
    "ecaresnet269d": dict(stem_width=32, stem_type="deep", avg_down=True,
                          block_args=dict(attn_layer="eca")),
    "senet154": dict(cardinality=64, base_width=4, stem_type="deep", down_kernel_size=3,
                     block_reduce_first=2, block_args=dict(attn_layer="se")),
}


def create(name, **kwargs):
    """timm.create_model(name), or for "NAME@1111" the shallow variant of NAME."""
    if name.endswith("@1111"):
        from timm.models.resnet import Bottleneck, ResNet
        base = name[:-len("@1111")]
        return ResNet(block=Bottleneck, layers=[1, 1, 1, 1], **SHALLOW_ARGS[base], **kwargs)
    return timm.create_model(name, **kwargs)
NUM_CLASSES = 10
INPUT_SHAPE = (2, 3, 64, 64)
M64 = (1 << 64) - 1


def fnv1a64(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def hashed(name, n):
    """n values in [-1, 1): 2u - 1, u from a splitmix64 finaliser of (hash(name), index)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(name)) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return 2.0 * u - 1.0


def golden_value(name, shape):
    """The deterministic tensor for state_dict key `name` (float64, then cast by the caller)."""
    n = int(np.prod(shape)) if len(shape) else 1
    s = hashed(name, n)
    last = name.rsplit(".", 1)[-1]
    if last == "running_mean":
        v = 0.1 * s
    elif last == "running_var":
        v = 1.0 + 0.25 * (s + 1.0)
    elif last == "weight" and len(shape) == 4:  # conv: He-uniform on fan_in
        fan_in = shape[1] * shape[2] * shape[3]
        v = s * math.sqrt(6.0 / fan_in)
    elif last == "weight" and len(shape) == 3:  # ECA's conv1d: He-uniform on fan_in
        v = s * math.sqrt(6.0 / (shape[1] * shape[2]))
    elif last == "weight" and len(shape) == 2:  # fc
        v = s / math.sqrt(shape[1])
    elif last == "weight":  # BN gamma
        v = 1.0 + 0.2 * s
    else:  # BN beta, conv bias (SE), fc bias
        v = 0.1 * s
    return v.reshape(shape)


def model_data():
    out = {}
    for name in NAMES:
        cfg = timm.models.registry._model_default_cfgs[name]
        out[name] = {"train_size_px": cfg["input_size"][1],
                     "test_size_px": cfg.get("test_input_size", cfg["input_size"])[1],
                     "crop_pct": cfg["crop_pct"], "interpolation": cfg["interpolation"]}
    return out


def fill(model):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            t.copy_(torch.from_numpy(golden_value(name, tuple(t.shape)).astype(np.float32)))


def keys():
    out = {}
    for name in NAMES:
        m = timm.create_model(name)
        out[name] = [[k, list(v.shape)] for k, v in m.state_dict().items()]
    return out


class Rng:
    """loader::rng::Rng (SplitMix64), for the trainer's drop-path masks."""

    def __init__(self, state):
        self.state = state

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def f64(self):
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


def rng_derive(seed, ids):
    """loader::rng::derive."""
    r = Rng(seed)
    h = r.next_u64()
    for i in ids:
        r.state ^= ((i * 0xD6E8FEB86659FD93) & M64) ^ h
        h = r.next_u64()
    return h


def keep_flags(seed, index, drop_prob, batch):
    """The trainer's drop-path keep flags of stream `index` (`drop_path_scales`)."""
    r = Rng(rng_derive(seed, [index]))
    return [r.f64() < 1.0 - drop_prob for _ in range(batch)]


def hashed_input(shape, name="input"):
    """The raw `hashed` values of `name` as a float32 tensor of `shape`."""
    return torch.from_numpy(hashed(name, int(np.prod(shape))).reshape(shape).astype(np.float32))


class SeededDropPath(torch.nn.Module):
    """timm DropPath (scale_by_keep) with the trainer's mask for block `index`."""

    def __init__(self, drop_prob, index, seed):
        super().__init__()
        self.drop_prob, self.index, self.seed = drop_prob, index, seed

    def keep_flags(self, batch):
        return keep_flags(self.seed, self.index, self.drop_prob, batch)

    def forward(self, x):
        keep = 1.0 - self.drop_prob
        mask = torch.tensor(self.keep_flags(x.shape[0]), dtype=x.dtype).view(-1, 1, 1, 1)
        return x.div(keep) * mask


def drop_path_forward(name="seresnet50", rate=0.5, seed=1234):
    m = timm.create_model(name, num_classes=NUM_CLASSES, drop_path_rate=rate)
    fill(m)
    m = m.double().train()
    blocks = [b for stage in [m.layer1, m.layer2, m.layer3, m.layer4] for b in stage]
    flags = []
    for i, b in enumerate(blocks):
        if b.drop_path is not None:
            b.drop_path = SeededDropPath(b.drop_path.drop_prob, i, seed)
            flags.append(b.drop_path.keep_flags(INPUT_SHAPE[0]))
        else:
            flags.append(None)
    x = hashed_input(INPUT_SHAPE)
    with torch.no_grad():
        logits = m(x.double())
    return {"model": name, "drop_path_rate": rate, "seed": seed, "keep_flags": flags,
            "train_logits_f64": logits.tolist()}


def drop_path_probs():
    out = {}
    for name in ["resnet18", "resnet50", "resnet101"]:
        m = timm.create_model(name, drop_path_rate=0.05)
        probs = []
        for stage in [m.layer1, m.layer2, m.layer3, m.layer4]:
            for block in stage:
                probs.append(0.0 if block.drop_path is None else float(block.drop_path.drop_prob))
        out[name] = probs
    return out


def forward(name, dtype):
    """Values are rounded to float32 first, then computed in `dtype` (float32 or float64)."""
    torch.manual_seed(0)
    m = create(name, num_classes=NUM_CLASSES)
    fill(m)
    m = m.to(dtype)
    x = hashed_input(INPUT_SHAPE)
    coef = hashed_input((2, NUM_CLASSES), "loss_coef")
    x, coef = x.to(dtype), coef.to(dtype)
    m.eval()
    with torch.no_grad():
        eval_logits = m(x)
    m.train()
    train_logits = m(x)
    loss = (train_logits * coef).sum()
    loss.backward()
    grad_norms = {k: float(p.grad.double().norm()) for k, p in m.named_parameters()}
    stats = {k: v.double().tolist()[:8] for k, v in m.state_dict().items()
             if k.endswith("running_mean") or k.endswith("running_var")}
    # Keep the file small: the stem BN and the last BN of the network.
    last_bn = [k for k in stats
               if k.startswith("layer4") or k.startswith("s4.") or k.startswith("bn2.")][-2:]
    first_bn = [k for k in stats if k.startswith("bn1.") or k.startswith("stem.bn.")]
    return {
        "eval_logits": eval_logits.double().tolist(),
        "train_logits": train_logits.double().tolist(),
        "loss": float(loss),
        "grad_norms": grad_norms,
        "running_stats": {k: stats[k] for k in first_bn + last_bn},
    }


def main():
    torch.set_num_threads(2)
    meta = {"timm": timm.__version__, "torch": torch.__version__}
    with open(os.path.join(OUT, "resnet_keys.json"), "w") as f:
        json.dump({"meta": meta, "models": keys()}, f, separators=(",", ":"))
    with open(os.path.join(OUT, "model_data.json"), "w") as f:
        json.dump({"meta": meta, "models": model_data()}, f, indent=1)
    with open(os.path.join(OUT, "resnet_drop_path.json"), "w") as f:
        json.dump({"meta": meta, "drop_path_rate": 0.05, "models": drop_path_probs(),
                   "seeded_forward": drop_path_forward()}, f, indent=1)
    fw = {"meta": meta, "num_classes": NUM_CLASSES, "input_shape": list(INPUT_SHAPE),
          "models": {n: {"f32": forward(n, torch.float32), "f64": forward(n, torch.float64)}
                     for n in FORWARD_NAMES}}
    with open(os.path.join(OUT, "resnet_forward.json"), "w") as f:
        json.dump(fw, f, indent=1)


if __name__ == "__main__":
    main()
