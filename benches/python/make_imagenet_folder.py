#!/usr/bin/env python3
"""Writes a synthetic ImageNet-layout folder for the input-pipeline
benchmark: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG, images of
500x375 or 375x500 pixels (half each, like most of ImageNet), JPEG quality
90 with 4:2:0 chroma subsampling (libjpeg-turbo through torchvision.io),
about 96 KB each.

The pictures are random fields with a photograph's falling spectrum (octaves
of smooth noise, amplitude halving per octave, correlated colour channels),
so that their entropy, and so the decoder's work, is that of ImageNet
photographs of that size rather than of flat colour or of pure noise.

    python benches/python/make_imagenet_folder.py --out /tmp/imagenet-synth
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg


def picture(h, w, g):
    """A float image [3, h, w] in [0, 255]."""
    lum = torch.zeros(1, 1, h, w)
    chroma = torch.zeros(1, 2, h, w)
    amp = 1.0
    # Octaves from about 4 pixels up to the whole image.
    size = 2
    while size <= max(h, w) // 4:
        sh, sw = max(2, size * h // max(h, w)), max(2, size * w // max(h, w))
        n = torch.randn(1, 3, sh, sw, generator=g)
        up = F.interpolate(n, size=(h, w), mode="bicubic", align_corners=False)
        lum += amp * up[:, :1]
        chroma += 0.45 * amp * up[:, 1:]
        size *= 2
        amp *= 0.8
    # Fine grain (sensor noise and texture below 4 pixels).
    lum += 0.5 * torch.randn(1, 1, h, w, generator=g)
    y = 118 + 42 * lum / lum.std()
    cb = 22 * chroma[:, :1] / chroma.std()
    cr = 22 * chroma[:, 1:] / chroma.std()
    r = y + 1.402 * cr
    gg = y - 0.344 * cb - 0.714 * cr
    b = y + 1.772 * cb
    return torch.cat([r, gg, b], 1)[0].clamp(0, 255)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=1000, help="training images in all")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--val-per-class", type=int, default=5)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    total = 0
    count = 0
    for split, per_class in (("train", args.images // args.classes), ("val", args.val_per_class)):
        for c in range(args.classes):
            d = os.path.join(args.out, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                h, w = (375, 500) if (c * per_class + i) % 2 == 0 else (500, 375)
                img = picture(h, w, g).round().to(torch.uint8)
                data = encode_jpeg(img, quality=args.quality)
                with open(os.path.join(d, f"n{c:08d}_{i}.JPEG"), "wb") as f:
                    f.write(data.numpy().tobytes())
                total += data.numel()
                count += 1
    print(f"{count} images written to {args.out}, {total / count / 1000:.1f} KB each on average")


if __name__ == "__main__":
    main()
