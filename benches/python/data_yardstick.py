#!/usr/bin/env python3
"""The torchvision.io yardstick of `shampoo-train bench-data`: the same
training input pipeline written the way a PyTorch user writes it today, on
the same folder, with the same number of worker processes.

Per image: `torchvision.io.decode_jpeg` (libjpeg-turbo) of the file's bytes
into a uint8 CHW tensor, `v2.RandomResizedCrop(224, antialias=True)` and
`v2.RandomHorizontalFlip()` on it; a `DataLoader` with `--workers` worker
processes stacks each batch into one uint8 tensor (normalisation belongs on
the device, as in `shampoo-train`). Like `bench-data`, a first untimed
pipeline reads `--warmup-images` (page cache), then a fresh one is timed from
its start to its last batch over `--images` images; CPU time is that of this
process and its worker processes over the same span. Prints one JSON line.

    python benches/python/data_yardstick.py --data /tmp/imagenet-synth --workers 2
"""
import argparse
import json
import os
import resource
import time

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2


class Folder(Dataset):
    def __init__(self, root, resolution):
        classes = sorted(d for d in os.listdir(root) if not d.startswith("."))
        self.samples = [
            (os.path.join(root, c, f), label)
            for label, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, c)))
            if not f.startswith(".")
        ]
        self.transform = v2.Compose([v2.RandomResizedCrop(resolution, antialias=True), v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        return self.transform(img), label


def cpu_seconds():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run(ds, args, images, seed):
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=False, num_samples=images, generator=g)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        prefetch_factor=2 if args.workers > 0 else None)
    n = 0
    for x, y in loader:
        n += y.numel()
    del loader  # worker processes are joined (and so counted in RUSAGE_CHILDREN)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with train/<class>/*.JPEG")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--warmup-images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = Folder(os.path.join(args.data, "train"), args.resolution)
    images = -(-args.images // args.batch_size) * args.batch_size
    if args.warmup_images > 0:
        run(ds, args, args.warmup_images, args.seed + 1)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    n = run(ds, args, images, args.seed)
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    print(json.dumps({
        "pipeline": "torchvision.io decode_jpeg + v2 RandomResizedCrop(antialias) + flip, DataLoader",
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "data": args.data, "folder_images": len(ds), "workers": args.workers, "batch_size": args.batch_size,
        "resolution": args.resolution, "images": n, "seconds": seconds, "images_per_s": n / seconds,
        "cpu_s": cpu, "images_per_cpu_s": n / cpu,
    }))


if __name__ == "__main__":
    main()
