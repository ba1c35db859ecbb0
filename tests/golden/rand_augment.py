"""Golden values for RandAugment's ops and for Mixup/CutMix, from timm v0.5.4 and Pillow.

Writes, beside this script, into augment/:
  <image>.png                  the inputs (generated here, stored so Rust reads the same bytes)
  <image>_<Op>.png             every variant of one op, stacked vertically in the order
                               golden.json lists them
  golden.json                  per variant: magnitude, sign, filter, timm's argument; the
                               Mixup/CutMix cases with their expected images and targets;
                               the Pillow and timm versions

The ops are timm's own functions (timm.data.auto_augment.NAME_TO_OP / LEVEL_TO_ARG), called
with a fixed sign (timm's _randomly_negate is replaced by a fixed choice) and a fixed filter,
on an RGB image, with the fill colour timm's train transform passes (124, 116, 104) and
translate_pct 0.45 (the default).

Mixup/CutMix: timm.data.mixup.FastCollateMixup in batch mode with its random draws replaced
by fixed values (lambda, cutmix or not, the box centre), so the expected u8 batch and the
targets are exact for given draws.

Run: python tests/golden/rand_augment.py
  (a venv with: pip install "timm==0.5.4" torch "numpy<2" pillow; timm 0.5.4 imports torch)
"""
import json
import os

import numpy as np
import PIL
from PIL import Image
import timm
import timm.data.auto_augment as aa
import timm.data.mixup as mx
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "augment")
FILL = (124, 116, 104)
MAGNITUDES = [0.0, 3.0, 5.5, 7.0, 10.0]
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
OPS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing",
    "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast",
    "ContrastIncreasing", "Brightness", "BrightnessIncreasing", "Sharpness",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
]
SIGNED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
NO_MAGNITUDE = {"AutoContrast", "Equalize", "Invert"}


def lcg(seed):
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        yield state >> 56


def scene(w, h, seed):
    """Gradients, a disc, stripes and noise: edges for the filters, a spread histogram."""
    noise = lcg(seed)
    a = np.zeros((h, w, 3), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            r = x * 255 // (w - 1)
            g = y * 255 // (h - 1)
            b = 220 if (x - w / 3) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2 else 30
            if (x // 3) % 2 == 0 and y > h * 2 // 3:
                r, g = 255 - r, 40
            n = next(noise) % 32 - 16
            a[y, x] = [min(255, max(0, v + n)) for v in (r, g, b)]
    return a


def dim(w, h, seed):
    """A low-contrast image (values 70..170) for AutoContrast, Equalize and Contrast."""
    noise = lcg(seed)
    a = np.zeros((h, w, 3), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            base = 70 + (x * 60) // w + (y * 40) // h
            a[y, x] = [base, 170 - (x * 50) // w, 100 + next(noise) % 40]
    return a


def op_args(name, magnitude, negate):
    aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
    level_fn = aa.LEVEL_TO_ARG[name]
    return level_fn(magnitude, {"translate_pct": 0.45}) if level_fn else ()


def variants(name):
    mags = [0.0] if name in NO_MAGNITUDE else MAGNITUDES
    signs = [False, True] if name in SIGNED else [False]
    filters = list(FILTERS) if name in GEOMETRIC else [None]
    return [(m, s, f) for m in mags for s in signs for f in filters]


def rand_augment_golden(images):
    out = {}
    for iname, arr in images.items():
        img = Image.fromarray(arr, "RGB")
        img.save(os.path.join(OUT, f"{iname}.png"))
        out[iname] = {"width": img.width, "height": img.height, "ops": {}}
        for name in OPS:
            rows, listed = [], []
            for m, neg, f in variants(name):
                args = op_args(name, m, neg)
                kwargs = dict(fillcolor=FILL, resample=FILTERS[f] if f else Image.BILINEAR)
                note = None
                try:
                    res = np.asarray(aa.NAME_TO_OP[name](img.copy(), *args, **kwargs))
                except ValueError as e:
                    # Pillow >= 10 rejects posterize(bits=0); the Pillow of 2021 (8.x) kept 0
                    # bits, i.e. made the image black: ImageOps.posterize's own lut formula.
                    assert name.startswith("Posterize") and args[0] == 0, e
                    res = np.asarray(img) & ~(2 ** 8 - 1)
                    note = "posterize to 0 bits: Pillow 8 formula (this Pillow raises)"
                rows.append(res.astype(np.uint8))
                listed.append({"magnitude": m, "negate": neg, "filter": f,
                               "arg": [float(a) for a in args], "note": note})
            Image.fromarray(np.concatenate(rows, axis=0), "RGB").save(
                os.path.join(OUT, f"{iname}_{name}.png"), optimize=True)
            out[iname]["ops"][name] = listed
    return out


def mix_golden():
    """FastCollateMixup batch mode with fixed draws."""
    b, c, h, w = 4, 3, 5, 6
    rng = lcg(99)
    batch = [(np.array([[[next(rng) for _ in range(w)] for _ in range(h)] for _ in range(c)],
                       dtype=np.uint8), label) for label in (0, 3, 1, 4)]
    cases = []
    for lam, cutmix, centre in [(0.3, False, None), (0.5, False, None), (0.9137, False, None),
                                (0.37, True, (2, 1)), (0.37, True, (4, 5)), (0.81, True, (0, 0))]:
        m = mx.FastCollateMixup(mixup_alpha=0.1, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                                mode="batch", label_smoothing=0.1, num_classes=5)
        m._params_per_batch = lambda lam=lam, cutmix=cutmix: (lam, cutmix)
        if centre is not None:
            it = iter(centre)
            mx.np.random.randint = lambda lo, hi, size=None: next(it)
        box = None
        if cutmix:
            (yl, yh, xl, xh), lam_c = mx.cutmix_bbox_and_lam((b, c, h, w), lam)
            it = iter(centre)
            box = [int(yl), int(yh), int(xl), int(xh)]
        output, target = m(list(batch))
        cases.append({
            "lam": lam, "cutmix": cutmix, "centre": centre, "box": box,
            # NCHW as timm produces it.
            "mixed": output.numpy().astype(int).tolist(),
            "target": [float(v) for v in target.numpy().astype(np.float32).ravel()],
            "lam_corrected": float(lam_c) if cutmix else lam,
        })
    return {
        "batch": [x.astype(int).tolist() for x, _ in batch],
        "labels": [int(y) for _, y in batch],
        "num_classes": 5, "smoothing": 0.1, "cases": cases,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    images = {"scene": scene(24, 18, 1), "dim": dim(16, 16, 2)}
    golden = {
        "pillow": PIL.__version__, "timm": timm.__version__, "numpy": np.__version__,
        "torch": torch.__version__, "fill": FILL,
        "images": rand_augment_golden(images),
        "mix": mix_golden(),
    }
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
