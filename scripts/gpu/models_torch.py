#!/usr/bin/env python3
"""models_torch.py - PyTorch's training step for the Table 3 models of issues 15 and 16, the
baseline scripts/gpu/models.sh compares train-bench with on the same GPU.

timm's model (the installed timm), synthetic data, bf16 autocast, BCE-with-logits loss (the RSB
recipes'), timm's Lamb (SGD where it is missing); convolutional networks in channels_last; the
ViTs' attention through torch.nn.functional.scaled_dot_product_attention (timm's own where it
already uses it, else each Attention module's forward replaced by an equivalent that calls it).
One JSON line per model: images_per_s, peak_mem_bytes (torch.cuda.max_memory_allocated).

Usage: models_torch.py MODEL... ; env MT_BATCH (256), MT_SIZE (224), MT_STEPS (10),
MT_WARMUP (3), MT_DEVICE (cuda; cpu for a smoke run of the script itself).
"""
import json
import os
import sys
import time

import timm
import torch
import torch.nn.functional as F


def sdpa_forward(attn):
    """timm's Attention.forward (qkv, heads, proj) with the product through sdpa."""

    def forward(x):
        b, n, c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return attn.proj(y.transpose(1, 2).reshape(b, n, c))

    return forward


def build(name, size, dev):
    kwargs = {"img_size": size} if name.startswith("vit_") else {}
    model = timm.create_model(name, num_classes=1000, **kwargs).to(dev)
    patched = 0
    if name.startswith("vit_"):
        for m in model.modules():
            if type(m).__name__ == "Attention" and not getattr(m, "fused_attn", False):
                m.forward = sdpa_forward(m)
                patched += 1
    else:
        model = model.to(memory_format=torch.channels_last)
    return model, patched


def main():
    batch = int(os.environ.get("MT_BATCH", "256"))
    size = int(os.environ.get("MT_SIZE", "224"))
    steps = int(os.environ.get("MT_STEPS", "10"))
    warmup = int(os.environ.get("MT_WARMUP", "3"))
    dev = torch.device(os.environ.get("MT_DEVICE", "cuda"))
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    for name in sys.argv[1:]:
        torch.manual_seed(0)
        model, patched = build(name, size, dev)
        model.train()
        try:
            from timm.optim import Lamb
            opt, opt_name = Lamb(model.parameters(), lr=5e-3, weight_decay=0.01), "timm Lamb"
        except Exception:  # noqa: BLE001
            opt, opt_name = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "SGD"
        mf = torch.contiguous_format if name.startswith("vit_") else torch.channels_last
        x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=mf)
        y = torch.zeros(batch, 1000, device=dev)
        y[torch.arange(batch), torch.randint(0, 1000, (batch,))] = 1.0
        loss_fn = torch.nn.BCEWithLogitsLoss()

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        print(json.dumps({
            "bench": "models-torch", "model": name, "batch_size": batch, "size": size,
            "steps": steps, "images_per_s": batch / dt, "ms_per_step": dt * 1e3,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "attention": ("sdpa (patched)" if patched else "timm's") if name.startswith("vit_") else None,
            "optimizer": opt_name, "torch": torch.__version__, "timm": timm.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        }), flush=True)
        del model, opt


if __name__ == "__main__":
    main()
