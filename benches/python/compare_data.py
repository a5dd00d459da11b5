#!/usr/bin/env python3
"""Side by side: `shampoo-train bench-data` against the torchvision.io
yardstick (`data_yardstick.py`) on the same folder, batch size, resolution,
image count and number of workers, run alternately several times; prints
medians and the ratio ours/theirs for each worker count.

    python benches/python/make_imagenet_folder.py --out /tmp/imagenet-synth
    python benches/python/compare_data.py --data /tmp/imagenet-synth --workers 1 2 --rounds 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--warmup-images", type=int, default=1000)
    ap.add_argument("--train", default=os.path.join(ROOT, "target", "release", "shampoo-train"))
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args()
    common = ["--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
              "--images", str(args.images), "--warmup-images", str(args.warmup_images)]
    results = {w: ([], []) for w in args.workers}
    for r in range(args.rounds):
        for w in args.workers:
            out = subprocess.run([args.train, "bench-data", "--data", args.data, "--data-workers", str(w)] + common,
                                 check=True, capture_output=True, text=True).stdout
            results[w][0].append(json.loads(out.strip().splitlines()[-1]))
            out = subprocess.run([sys.executable, os.path.join(HERE, "data_yardstick.py"), "--data", args.data,
                                  "--workers", str(w)] + common, check=True, capture_output=True, text=True).stdout
            results[w][1].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = statistics.median
    rows = []
    for w in args.workers:
        ours, theirs = results[w]
        row = {
            "workers": w,
            "ours_images_per_s": med(o["images_per_s"] for o in ours),
            "torchvision_images_per_s": med(t["images_per_s"] for t in theirs),
            "ours_images_per_cpu_s": med(o["images_per_cpu_s"] for o in ours),
            "torchvision_images_per_cpu_s": med(t["images_per_cpu_s"] for t in theirs),
        }
        row["ratio"] = row["ours_images_per_s"] / row["torchvision_images_per_s"]
        row["ratio_per_cpu_s"] = row["ours_images_per_cpu_s"] / row["torchvision_images_per_cpu_s"]
        rows.append(row)
    if args.json:
        print(json.dumps({"data": args.data, "rounds": args.rounds, "batch_size": args.batch_size,
                          "resolution": args.resolution, "images": args.images, "rows": rows,
                          "torch": results[args.workers[0]][1][0]["torch"],
                          "torchvision": results[args.workers[0]][1][0]["torchvision"]}))
        return
    print(f"{args.data}: {results[args.workers[0]][0][0]['folder_images']} training images, batch {args.batch_size}, "
          f"{args.resolution} px, {args.images} images timed, medians of {args.rounds} rounds")
    print("| workers | ours img/s | torchvision.io img/s | ratio | ours img/CPU-s | torchvision.io img/CPU-s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['ours_images_per_s']:.0f} | {r['torchvision_images_per_s']:.0f} | "
              f"**{r['ratio']:.2f}** | {r['ours_images_per_cpu_s']:.0f} | {r['torchvision_images_per_cpu_s']:.0f} | "
              f"{r['ratio_per_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
