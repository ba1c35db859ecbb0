"""Golden data for the Vision Transformer tests of trainer/tests/resnet_golden.rs, from timm 0.5.4
(torch 2.5.1 CPU).

Run from the repository root (after resnet_golden.py, whose helpers it imports):
    .venv-torch/bin/python trainer/tests/golden/vit_golden.py
It writes vit_forward.json next to this script:
  drop_probs     timm's per-block DropPath probabilities of vit_small_patch16_224 at
                 drop_path_rate=0.1 (torch.linspace in float32)
  resample       timm's `resize_pos_embed` of a hashed [1, 17, 8] embedding (one class token and a
                 4x4 grid) to other grids, in float64
  models         for ViT-Ti and ViT-S built at 32 px (a 2x2 grid), 10 classes, drop_path_rate 0.5,
                 weights from resnet_golden's hash formula: eval logits, train logits with every
                 DropPath applying the trainer's masks (block b's attention branch draws stream
                 2b, its MLP branch 2b + 1; probability 0.5 * b / 11), gradient L2 norms of
                 sum(train_logits * coef), and the eval logits at 48 px of the same weights with
                 the position embedding resampled to 3x3 by `resize_pos_embed` (timm's model
                 built at 48 px), in float32 and float64
"""
import json
import os
import sys

import numpy as np
import timm
import torch
from timm.models.vision_transformer import resize_pos_embed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resnet_golden as rg  # noqa: E402

OUT = os.path.dirname(os.path.abspath(__file__))
NAMES = ["vit_tiny_patch16_224", "vit_small_patch16_224"]
IMG, IMG_TEST, NUM_CLASSES, RATE, SEED = 32, 48, 10, 0.5, 1234
INPUT_SHAPE = (2, 3, IMG, IMG)


class PairDropPath(torch.nn.Module):
    """timm's one DropPath per block, called twice per forward, with the trainer's masks."""

    def __init__(self, drop_prob, block, seed):
        super().__init__()
        self.drop_prob, self.block, self.seed, self.calls = drop_prob, block, seed, 0

    def forward(self, x):
        index = 2 * self.block + self.calls % 2
        self.calls += 1
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        flags = rg.keep_flags(self.seed, index, self.drop_prob, x.shape[0])
        mask = torch.tensor(flags, dtype=x.dtype).view(-1, 1, 1)
        return x.div(keep) * mask


def forward(name, dtype):
    torch.manual_seed(0)
    m = timm.create_model(name, img_size=IMG, num_classes=NUM_CLASSES, drop_path_rate=RATE)
    rg.fill(m)
    depth = len(m.blocks)
    for b, blk in enumerate(m.blocks):
        blk.drop_path = PairDropPath(RATE * b / (depth - 1), b, SEED)
    m = m.to(dtype)
    x = rg.hashed_input(INPUT_SHAPE).to(dtype)
    coef = rg.hashed_input((2, NUM_CLASSES), "loss_coef").to(dtype)
    m.eval()
    with torch.no_grad():
        eval_logits = m(x)
    m.train()
    train_logits = m(x)
    loss = (train_logits * coef).sum()
    loss.backward()
    grad_norms = {k: float(p.grad.double().norm()) for k, p in m.named_parameters()}

    big = timm.create_model(name, img_size=IMG_TEST, num_classes=NUM_CLASSES).to(dtype).eval()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], big.pos_embed, 1, (3, 3))
    big.load_state_dict(sd)
    xb = rg.hashed_input((2, 3, IMG_TEST, IMG_TEST), "input48").to(dtype)
    with torch.no_grad():
        eval48 = big(xb)
    return {
        "eval_logits": eval_logits.double().tolist(),
        "train_logits": train_logits.double().tolist(),
        "loss": float(loss),
        "grad_norms": grad_norms,
        "eval_logits_48px": eval48.double().tolist(),
    }


def resample():
    pe = torch.from_numpy(rg.golden_value("pos_embed", (1, 17, 8)).astype(np.float32)).double()
    out = {}
    for gs in [(6, 6), (3, 3), (5, 7), (2, 2), (4, 4)]:
        new = torch.zeros(1, 1 + gs[0] * gs[1], 8, dtype=torch.float64)
        out[f"{gs[0]}x{gs[1]}"] = resize_pos_embed(pe, new, 1, gs).tolist()
    return out


def main():
    torch.set_num_threads(2)
    meta = {"timm": timm.__version__, "torch": torch.__version__}
    m = timm.create_model("vit_small_patch16_224", drop_path_rate=0.1)
    probs = [0.0 if isinstance(b.drop_path, torch.nn.Identity) else float(b.drop_path.drop_prob)
             for b in m.blocks]
    out = {"meta": meta, "num_classes": NUM_CLASSES, "input_shape": list(INPUT_SHAPE),
           "img_test": IMG_TEST, "drop_path_rate": RATE, "seed": SEED,
           "drop_probs": {"rate": 0.1, "probs": probs},
           "resample": resample(),
           "models": {n: {"f32": forward(n, torch.float32), "f64": forward(n, torch.float64)}
                      for n in NAMES}}
    with open(os.path.join(OUT, "vit_forward.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
