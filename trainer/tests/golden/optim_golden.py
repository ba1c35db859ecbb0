"""Golden values for trainer's losses, optimizers and LR schedule, computed with timm 0.5.4.

Run with the golden venv (torch 2.5.1 CPU, timm==0.5.4, numpy<2):

    /work/.venv-golden/bin/python trainer/tests/golden/optim_golden.py trainer/tests/golden

Writes optim_golden.json (LAMB, SGD), loss_golden.json and schedule_golden.json. The Rust tests
(trainer/tests/golden.rs) read only these JSON files; CI needs no python.
Floats are written as the shortest decimal of their f32 value (f64 for the schedule), so parsing
and casting back to f32 gives the exact torch value.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.optim.optim_factory import add_weight_decay
from timm.scheduler import create_scheduler
from timm.scheduler.cosine_lr import CosineLRScheduler

assert timm.__version__ == "0.5.4", timm.__version__
torch.set_num_threads(1)


def f32(t):
    """A tensor as a flat list of floats, each the shortest decimal of its f32 value."""
    return [float(str(np.float32(x))) for x in t.detach().reshape(-1).tolist()]


class Tiny(nn.Module):
    """Mixed parameter kinds: 4-D conv weight, 1-D BN weight/bias, 2-D matrix + bias,
    and a zero-initialised 2-D weight (exercises LAMB's ||w|| = 0 branch)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.proj = nn.Linear(5, 3, bias=False)


def make_model(gen):
    m = Tiny()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        m.proj.weight.zero_()
    return m


# Per step: global gradient-norm target (> 1 clips, < 1 does not), lr, and params without a grad.
STEPS = [
    dict(norm=3.0, lr=0.1, no_grad=[]),
    dict(norm=0.5, lr=0.3, no_grad=[]),
    dict(norm=10.0, lr=0.05, no_grad=["fc.bias"]),
    dict(norm=0.2, lr=0.2, no_grad=[]),
    dict(norm=1.5, lr=0.15, no_grad=[]),
]


def make_grads(model, gen):
    """Fixed random gradients per step, scaled so the global norm hits the step's target."""
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = []
    for s in STEPS:
        g = {n: torch.randn(shapes[n], generator=gen) for n in names if n not in s["no_grad"]}
        total = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values()))
        g = {n: (t * (s["norm"] / total)).float() for n, t in g.items()}
        # Tiny gradients for one no-decay parameter: sqrt(v) ~ 1e-7, so eps (1e-6) dominates the
        # denominator and a wrong eps (Adam's 1e-8) shows up in the golden values.
        g["bn1.bias"] = g["bn1.bias"] * 1e-6
        out.append(g)
    return out


def run_optimizer(model, opt, grads):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    steps = []
    for s, g in zip(STEPS, grads):
        for group in opt.param_groups:
            group["lr"] = s["lr"]
        for n in names:
            params[n].grad = g[n].clone() if n in g else None
        global_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values()))
        opt.step()
        steps.append(dict(
            lr=s["lr"],
            global_grad_norm=global_norm,
            grads={n: f32(t) for n, t in g.items()},
            params_after={n: f32(params[n]) for n in names},
        ))
    return steps


def optim_golden():
    gen = torch.Generator().manual_seed(1234)
    model0 = make_model(gen)
    grads = make_grads(model0, gen)
    init = {n: p.detach().clone() for n, p in model0.named_parameters()}
    params_desc = {n: dict(shape=list(p.shape), init=f32(p)) for n, p in model0.named_parameters()}
    groups = add_weight_decay(model0, 0.02)

    out = dict(params=params_desc, groups=dict(
        no_decay=[n for n, p in model0.named_parameters() if any(p is q for q in groups[0]["params"])],
        decay=[n for n, p in model0.named_parameters() if any(p is q for q in groups[1]["params"])],
    ))

    def fresh():
        m = Tiny()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(init[n])
        return m

    # LAMB exactly as timm's train.py builds it: create_optimizer_v2 -> add_weight_decay groups.
    m = fresh()
    opt = create_optimizer_v2(m, "lamb", lr=0.1, weight_decay=0.02)
    assert type(opt).__name__ == "Lamb", type(opt)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["max_grad_norm"] == 1.0
    steps = run_optimizer(m, opt, grads)
    params = dict(m.named_parameters())
    state = {}
    for n, p in params.items():
        st = opt.state[p]
        if st:
            state[n] = dict(exp_avg=f32(st["exp_avg"]), exp_avg_sq=f32(st["exp_avg_sq"]))
    out["lamb"] = dict(weight_decay=0.02, betas=[0.9, 0.999], eps=1e-6, max_grad_norm=1.0,
                       steps=steps, final_state=state,
                       final_step=opt.param_groups[0]["step"])

    # SGD with momentum (PyTorch semantics), same groups, nesterov and plain.
    out["sgd"] = []
    for nesterov in (True, False):
        m = fresh()
        g = add_weight_decay(m, 1e-4)
        opt = torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=nesterov)
        out["sgd"].append(dict(weight_decay=1e-4, momentum=0.9, nesterov=nesterov,
                               steps=run_optimizer(m, opt, grads)))
    return out


def loss_case(name, loss_fn, logits, target, **meta):
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, target)
    loss.backward()
    return dict(name=name, logits_shape=list(logits.shape), logits=f32(logits),
                target_shape=list(target.shape),
                target=f32(target) if target.is_floating_point() else target.tolist(),
                loss=float(str(np.float32(loss.item()))), grad=f32(x.grad), **meta)


def loss_golden():
    gen = torch.Generator().manual_seed(99)
    b, c = 6, 10
    logits = torch.randn(b, c, generator=gen) * 3.0
    logits[0, 0] = 40.0   # large magnitudes: the stable BCE form must not overflow
    logits[1, 1] = -40.0
    logits[2, 2] = 0.0    # exactly 0: the |x| and relu kinks must still give sigmoid(0) - y
    labels = torch.tensor([3, 1, 7, 0, 9, 3])
    cases = []
    for smoothing in (0.1, 0.0):
        for thr in (0.2, None):
            cases.append(loss_case(
                f"bce_classes_s{smoothing}_t{thr}",
                BinaryCrossEntropy(smoothing=smoothing, target_threshold=thr), logits, labels,
                kind="bce", smoothing=smoothing, target_threshold=thr))
    # Mixup/CutMix-style dense targets (partner = flipped batch), smoothed inside mixup as timm does.
    for lam in (0.7, 0.35, 0.9):
        dense = mixup_target(labels, c, lam=lam, smoothing=0.1, device="cpu")
        for thr in (0.2, None):
            cases.append(loss_case(
                f"bce_dense_lam{lam}_t{thr}",
                BinaryCrossEntropy(smoothing=0.1, target_threshold=thr), logits, dense,
                kind="bce", smoothing=0.1, target_threshold=thr))
        cases.append(loss_case(f"soft_ce_lam{lam}", SoftTargetCrossEntropy(), logits, dense,
                               kind="soft_ce"))
    for smoothing in (0.1, 0.0):
        cases.append(loss_case(f"ls_ce_s{smoothing}", LabelSmoothingCrossEntropy(smoothing), logits,
                               labels, kind="ls_ce", smoothing=smoothing))
    ce = F.cross_entropy(logits, labels).item()
    return dict(cases=cases, plain_cross_entropy=float(str(np.float32(ce))))


class Args:
    """The train.py v0.5.4 arguments create_scheduler reads."""

    def __init__(self, epochs, lr, cooldown):
        self.sched = "cosine"
        self.epochs = epochs
        self.lr = lr
        self.min_lr = 1e-6
        self.warmup_lr = 1e-4
        self.warmup_epochs = 5
        self.cooldown_epochs = cooldown
        self.decay_rate = 0.1
        self.lr_noise = None
        self.seed = 42


def schedule_golden():
    cases = []
    for name, epochs, lr in (("a1", 600, 5e-3), ("a2", 300, 5e-3), ("a3", 100, 8e-3)):
        for cooldown in (10, 0):
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
            sched, num_epochs = create_scheduler(Args(epochs, lr, cooldown), opt)
            # train.py: the constructor sets epoch 0's rate; step(epoch + 1) after every epoch.
            lrs = []
            for epoch in range(num_epochs + 2):
                lrs.append(opt.param_groups[0]["lr"])
                sched.step(epoch + 1)
            cases.append(dict(name=f"{name}_cooldown{cooldown}", per_update=False, base_lr=lr,
                              warmup_lr=1e-4, warmup_epochs=5, min_lr=1e-6, epochs=epochs,
                              cooldown_epochs=cooldown, num_epochs=num_epochs, lrs=lrs))
    # Per update (timm HEAD --sched-on-updates): HEAD's scheduler_factory multiplies t_initial,
    # warmup_t and the cooldown by updates_per_epoch and sets t_in_epochs=False; train_one_epoch
    # calls step_update(num_updates) after each update. v0.5.4's CosineLRScheduler has the same
    # _get_lr, so it is driven directly here.
    epochs, warmup, cooldown, upe, lr = 20, 3, 2, 7, 8e-3
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=epochs * upe, lr_min=1e-6, cycle_decay=0.1,
                              cycle_limit=1, warmup_t=warmup * upe, warmup_lr_init=1e-4,
                              t_in_epochs=False)
    lrs = []
    for update in range((epochs + cooldown) * upe):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update(update + 1)
        sched.step(update // upe + 1) if (update + 1) % upe == 0 else None  # a no-op on updates
    cases.append(dict(name="per_update", per_update=True, updates_per_epoch=upe, base_lr=lr,
                      warmup_lr=1e-4, warmup_epochs=warmup, min_lr=1e-6, epochs=epochs,
                      cooldown_epochs=cooldown, num_epochs=epochs + cooldown, lrs=lrs))
    return dict(cases=cases)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    a = ap.parse_args()
    meta = dict(generator="trainer/tests/golden/optim_golden.py", timm=timm.__version__,
                torch=torch.__version__)
    for fname, fn in (("optim_golden.json", optim_golden), ("loss_golden.json", loss_golden),
                      ("schedule_golden.json", schedule_golden)):
        data = dict(meta=meta, **fn())
        path = os.path.join(a.out_dir, fname)
        with open(path, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.write("\n")
        print(f"{path}: {os.path.getsize(path)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
