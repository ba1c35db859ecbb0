"""Golden data for trainer/tests/weights_golden.rs: timm weights saved by torch, and timm's logits.

Run from the repository root with a venv holding timm 0.5.4, torch 2.5.1 (CPU) and safetensors:
    .venv-torch/bin/python trainer/tests/golden/weights_golden.py
It writes, next to this script:
  weights_resnet10.pth.gz          torch.save(model.state_dict()): a bare state_dict, as timm's
                                   RSB release files hold it (float32, num_batches_tracked kept)
  weights_resnet10_wrapped.pth.gz  torch.save({"state_dict": ..., "epoch": 7, "arch": ...}), as
                                   timm's train.py writes checkpoints (every key under "module."
                                   as a DistributedDataParallel model's state_dict has them)
  weights_resnet10_f16.pth.gz      {"model": state_dict in float16}: the key "model", half floats
  weights_resnet10.safetensors.gz  safetensors.torch.save_file of the float32 state_dict
  weights_logits.json              the eval-mode logits of the float32 model and of the float16
                                   weights (converted back to float32) on one input

The model is timm's ResNet with BasicBlocks and one block per stage ("resnet10": resnet18's
widths, so every kind of tensor of the family is there), 10 classes. The files are gzipped so the
repository holds kilobytes, not megabytes: every tensor repeats a period of 509 values (hashed from
its name, scaled as in resnet_golden.py), which deflate compresses well; the Rust test gunzips
them to a temporary directory and loads the bytes torch wrote. The input is `hashed("input", n)`
of resnet_golden.py (2x3x32x32), which the Rust test reproduces bit for bit.
"""
import gzip
import json
import os
import shutil
import tempfile

import numpy as np
import timm  # noqa: F401  (the version is recorded)
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, ResNet

from resnet_golden import golden_value, hashed

OUT = os.path.dirname(os.path.abspath(__file__))
PERIOD = 509
NUM_CLASSES = 10
INPUT_SHAPE = (2, 3, 32, 32)


def periodic_value(name, shape):
    """golden_value's scaling of a tensor whose values repeat every PERIOD elements."""
    n = int(np.prod(shape)) if len(shape) else 1
    # golden_value scales conv and fc weights by their fan-in, so it sees the full shape.
    one = golden_value(name, shape).reshape(-1)[: min(n, PERIOD)]
    return np.resize(one, n).reshape(shape)


def main():
    torch.manual_seed(0)
    model = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(3)
                continue
            t.copy_(torch.from_numpy(periodic_value(name, tuple(t.shape))).to(t.dtype))
    x = torch.from_numpy(hashed("input", int(np.prod(INPUT_SHAPE))).reshape(INPUT_SHAPE)).float()
    with torch.no_grad():
        logits = model(x)
    sd = model.state_dict()
    sd16 = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    model16 = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=NUM_CLASSES).eval()
    model16.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd16.items()})
    with torch.no_grad():
        logits16 = model16(x)

    tmp = tempfile.mkdtemp()
    files = {
        "weights_resnet10.pth": lambda p: torch.save(sd, p),
        "weights_resnet10_wrapped.pth": lambda p: torch.save(
            {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 7,
             "arch": "resnet10"}, p),
        "weights_resnet10_f16.pth": lambda p: torch.save({"model": sd16}, p),
        "weights_resnet10.safetensors": lambda p: save_file(
            {k: v.contiguous() for k, v in sd.items()}, p),
    }
    sizes = {}
    for name, write in files.items():
        path = os.path.join(tmp, name)
        write(path)
        sizes[name] = os.path.getsize(path)
        # mtime=0: the same bytes on every run.
        with open(path, "rb") as f, open(os.path.join(OUT, name + ".gz"), "wb") as raw:
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                shutil.copyfileobj(f, gz)
    shutil.rmtree(tmp)
    with open(os.path.join(OUT, "weights_logits.json"), "w") as f:
        json.dump({
            "timm": timm.__version__, "torch": torch.__version__,
            "layers": [1, 1, 1, 1], "num_classes": NUM_CLASSES, "input_shape": INPUT_SHAPE,
            "file_bytes": sizes,
            "logits": logits.tolist(), "logits_f16_weights": logits16.tolist(),
        }, f, indent=1)


if __name__ == "__main__":
    main()
