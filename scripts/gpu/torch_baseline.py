#!/usr/bin/env python3
# Copied from ../shared/gpu/torch_baseline.py (the project's PyTorch anchor) so the device
# script can run it (the device tool carries only this repository); one addition: TB_CONFIGS.
"""torch_baseline.py - timm resnet50 training-step throughput on one GPU (synthetic data).

Configs: bf16 autocast + channels_last at 224px and 160px (batch 256), eager NCHW bf16
autocast at 224px (batch 256, and batch 64 to compare with the candle probe). Loss: BCEWithLogits (as in the ResNet-strikes-back recipes); optimizer:
timm.optim.Lamb when importable, else torch.optim.SGD. 5 warmup + 20 timed steps.
Prints one line per config. Env: TB_BATCH (256), TB_STEPS (20), TB_WARMUP (5), TB_COMPILE=1
adds a torch.compile run at 224px, TB_CONFIGS=channels_last runs only the channels_last configs.
"""
import os
import sys
import time
import traceback


def main() -> int:
    try:
        import torch
        import torch.nn as nn
    except Exception as e:  # noqa: BLE001
        print(f"[FAIL] torch: cannot import torch: {e}")
        return 1

    try:
        import timm
    except Exception as e:  # noqa: BLE001
        print(f"[FAIL] torch: cannot import timm: {e}")
        return 1
    if not torch.cuda.is_available():
        print("[FAIL] torch: CUDA not available")
        return 1
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
        f"timm {timm.__version__}, GPU {torch.cuda.get_device_name(0)}"
    )
    batch = int(os.environ.get("TB_BATCH", "256"))
    steps = int(os.environ.get("TB_STEPS", "20"))
    warmup = int(os.environ.get("TB_WARMUP", "5"))

    def make_opt(params):
        try:
            from timm.optim import Lamb

            return Lamb(params, lr=5e-3, weight_decay=0.01), "timm Lamb"
        except Exception:  # noqa: BLE001
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4), "SGD"

    def run(name, size, channels_last, compile_model=False, batch=batch):
        torch.manual_seed(0)
        model = timm.create_model("resnet50", num_classes=1000).to(dev)
        mf = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=mf)
        model.train()
        opt, opt_name = make_opt(model.parameters())
        crit = nn.BCEWithLogitsLoss()
        x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=mf)
        y = torch.zeros(batch, 1000, device=dev)
        y[torch.arange(batch), torch.randint(0, 1000, (batch,), device=dev)] = 1.0
        fwd = torch.compile(model) if compile_model else model

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fwd(x)
                loss = crit(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        t_warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"[PASS] torch {name}: batch {batch} {size}px: {batch / dt:.0f} img/s "
            f"({dt * 1e3:.1f} ms/step, {steps} steps after {warmup} warmups [{t_warm:.1f}s]; "
            f"{opt_name}; loss {loss.item():.4f}; peak mem {mem:.1f} GiB)",
            flush=True,
        )
        del model, opt, x, y
        torch.cuda.empty_cache()

    configs = [
        ("bf16-autocast channels_last", 224, True, False, batch),
        ("bf16-autocast channels_last", 160, True, False, batch),
        ("bf16-autocast eager NCHW", 224, False, False, batch),
        # same batch as the candle probe's headline number, for an apples-to-apples ratio
        ("bf16-autocast eager NCHW", 224, False, False, 64),
    ]
    if os.environ.get("TB_CONFIGS") == "channels_last":
        configs = [c for c in configs if c[2]]
    if os.environ.get("TB_COMPILE") == "1":
        configs.append(("bf16-autocast channels_last torch.compile", 224, True, True, batch))
    failed = 0
    for name, size, cl, comp, b in configs:
        try:
            run(name, size, cl, comp, b)
        except Exception as e:  # noqa: BLE001
            failed += 1
            msg = "".join(traceback.format_exception_only(type(e), e)).strip().replace("\n", " | ")
            print(f"[FAIL] torch {name} batch {b} {size}px: {msg[:500]}", flush=True)
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
