"""Golden values for the loader's eval transform and crop-resize, from PIL.

Writes, beside this script:
  eval/<name>.jpg                    three test JPEGs (PIL, quality 90, 4:2:0)
  eval/<name>_eval<size>.png         timm's eval transform of the JPEG
  eval/<name>_box<k>_<filter>.png    PIL img.crop(box).resize((64, 64), filter)
  eval/golden.json                   the boxes, sizes and the Pillow version

timm's eval transform (timm.data.transforms_factory.transforms_imagenet_eval, v0.5.4) is
torchvision's Resize(floor(size / crop_pct), BICUBIC) then CenterCrop(size). On PIL images
torchvision does exactly this (torchvision.transforms.functional.resize / center_crop):
  shorter side -> scale_size, longer side -> int(scale_size * long / short), PIL resize;
  crop offsets int(round((H - size) / 2.0)), int(round((W - size) / 2.0)).
The same arithmetic is written out here so that the script needs only Pillow.

Run: python3 tests/golden/eval_transform.py   (pip install pillow)
"""
import json
import math
import os

import PIL
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "eval")


def make_image(w, h, seed):
    img = Image.new("RGB", (w, h))
    px = img.load()
    for y in range(h):
        for x in range(w):
            r = (x * 255) // max(1, w - 1)
            g = (y * 255) // max(1, h - 1)
            b = ((x // (7 + seed)) + (y // (5 + seed))) % 2 * 200 + ((x * y + seed * 31) % 37)
            px[x, y] = (r, g, min(255, b))
    return img


def eval_transform(img, size, crop_pct):
    scale_size = int(math.floor(size / crop_pct))
    w, h = img.size
    if w <= h:
        nw, nh = scale_size, int(scale_size * h / w)
    else:
        nw, nh = int(scale_size * w / h), scale_size
    img = img.resize((nw, nh), Image.BICUBIC)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def main():
    os.makedirs(OUT, exist_ok=True)
    images = {"land": (300, 200, 1), "port": (199, 333, 2), "wide": (500, 375, 3)}
    evals = [(224, 0.95), (64, 0.875)]
    boxes = [(10, 20, 150, 120), (0, 0, 199, 200), (33, 41, 97, 71)]
    golden = {"pillow": PIL.__version__, "images": {}, "evals": evals, "boxes": boxes}
    for name, (w, h, seed) in images.items():
        path = os.path.join(OUT, f"{name}.jpg")
        make_image(w, h, seed).save(path, quality=90, subsampling=2)
        # Everything below starts from the decoded JPEG, as the loader does.
        img = Image.open(path).convert("RGB")
        for size, crop_pct in evals:
            eval_transform(img, size, crop_pct).save(os.path.join(OUT, f"{name}_eval{size}.png"))
        for k, (l, t, bw, bh) in enumerate(boxes):
            if l + bw > w or t + bh > h:
                continue
            for fname, f in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
                out = img.crop((l, t, l + bw, t + bh)).resize((64, 64), f)
                out.save(os.path.join(OUT, f"{name}_box{k}_{fname}.png"))
        golden["images"][name] = [w, h]
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
