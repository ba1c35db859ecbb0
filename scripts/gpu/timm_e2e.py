#!/usr/bin/env python3
"""timm_e2e.py - timm's own end-to-end training throughput, to compare with our `train`.

Reads an ImageNet-style folder (DATA/train/<class>/*.JPEG) with timm's ImageDataset and
`create_loader` (worker processes, pinned memory, the CUDA prefetcher, FastCollateMixup as the
collate function, RandAugment), and trains timm's resnet50 on it: bf16 autocast, channels_last,
timm.optim.Lamb, timm.loss.BinaryCrossEntropy(target_threshold=0.2). After --warmup steps it
times --steps steps. The loop is our trainer's: launch the step, take the next batch from the
loader (the time blocked there counts as waiting for data; the device is still working on the
step meanwhile), then read the loss (a device sync).

Prints one JSON line: images_per_s, loader_wait_frac (waiting for data / wall time), CPU
utilisation over the timed steps (from /proc/stat), peak GPU memory.
"""
import argparse
import json
import os
import sys
import time


def cpu_jiffies():
    """(total, idle) jiffies summed over all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder holding train/<class>/*.JPEG")
    p.add_argument("--label", default="timm")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--aa", default="rand-m7-mstd0.5-inc1", help="timm auto_augment string")
    p.add_argument("--mixup", type=float, default=0.1)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--interpolation", default="random")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args()

    import torch
    import timm
    from timm.data import FastCollateMixup, ImageDataset, create_loader
    from timm.loss import BinaryCrossEntropy
    from timm.optim import Lamb

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    t_setup = time.perf_counter()
    dataset = ImageDataset(os.path.join(args.data, "train"))
    num_classes = len(set(dataset.reader.class_to_idx.values()))
    mixup = FastCollateMixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )
    loader = create_loader(
        dataset,
        input_size=(3, args.size, args.size),
        batch_size=args.batch,
        is_training=True,
        use_prefetcher=True,
        re_prob=0.0,
        hflip=0.5,
        auto_augment=args.aa,
        interpolation=args.interpolation,
        num_workers=args.workers,
        collate_fn=mixup,
        pin_memory=True,
        device=dev,
        persistent_workers=True,
    )
    model = timm.create_model("resnet50", num_classes=num_classes)
    model = model.to(dev).to(memory_format=torch.channels_last)
    model.train()
    opt = Lamb(model.parameters(), lr=args.lr, weight_decay=0.02)
    criterion = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2).to(dev)

    def batches():
        while True:
            for xs, ys in loader:
                yield xs, ys

    it = batches()
    wait_s = 0.0
    images = 0
    t0 = None
    cpu0 = None
    xs, ys = next(it)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            cpu0 = cpu_jiffies()
            wait_s, images = 0.0, 0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(xs.contiguous(memory_format=torch.channels_last))
            loss = criterion(out, ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += xs.shape[0]
        # As our trainer: the next batch is taken while the device works through this step,
        # and the time blocked on the loader counts as waiting; then the loss is read (a sync).
        tw = time.perf_counter()
        xs, ys = next(it)
        wait_s += time.perf_counter() - tw
        loss_value = loss.item()
        if step == 0:
            setup_s = time.perf_counter() - t_setup
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu1 = cpu_jiffies()
    total, idle = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    ncpu = os.cpu_count() or 1
    busy_frac = (total - idle) / max(total, 1)
    print(
        json.dumps(
            {
                "impl": "timm",
                "label": args.label,
                "timm": timm.__version__,
                "torch": torch.__version__,
                "size": args.size,
                "batch": args.batch,
                "workers": args.workers,
                "auto_augment": args.aa,
                "steps": args.steps,
                "warmup": args.warmup,
                "images_per_s": images / wall,
                "loader_wait_frac": wait_s / wall,
                "data_wait_s": wait_s,
                "wall_s": wall,
                "setup_s": setup_s,
                "cpu_busy_frac": busy_frac,
                "cpu_cores_busy": busy_frac * ncpu,
                "num_cpus": ncpu,
                "train_images": len(dataset),
                "last_loss": loss_value,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
