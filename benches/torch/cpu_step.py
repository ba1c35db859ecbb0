"""PyTorch's side of scripts/bench-cpu-vs-torch.sh: images/s of timm's model on the CPU.

Training step: forward, cross-entropy, backward, SGD with momentum (the issue's comparison, the
plain PyTorch step a user would write); evaluation: the forward in eval mode under no_grad. The
model is in PyTorch's default (NCHW) layout with its default thread count (one per core), on
random inputs of the same batch and size as our run. Prints one JSON line.
"""
import argparse
import json
import resource
import time

import timm
import torch


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        fn()
    wall = time.perf_counter() - t0
    return wall / steps, (cpu_seconds() - c0) / wall


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    a = p.parse_args()
    torch.manual_seed(0)
    # timm 0.5.4's ViTs take only the input size they were built for (`img_size`).
    extra = {"img_size": a.size} if a.model.startswith("vit_") else {}
    model = timm.create_model(a.model, num_classes=a.num_classes, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(a.batch_size, 3, a.size, a.size)
    y = torch.randint(0, a.num_classes, (a.batch_size,))

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def eval_step():
        with torch.no_grad():
            model(x)

    model.train()
    train_dt, train_busy = timed(train_step, a.steps, a.warmup)
    model.eval()
    eval_dt, eval_busy = timed(eval_step, a.steps, a.warmup)
    print(json.dumps({
        "model": a.model, "size": a.size, "batch_size": a.batch_size, "steps": a.steps,
        "train_images_per_s": a.batch_size / train_dt, "train_cpu_busy_cores": train_busy,
        "eval_images_per_s": a.batch_size / eval_dt, "eval_cpu_busy_cores": eval_busy,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "timm": timm.__version__,
    }))


if __name__ == "__main__":
    main()
