#!/usr/bin/env python3
"""Side by side: `shampoo-bench step` against the PyTorch yardstick
(`published_step.py`) on the same shape set, dtype and thread count, run
alternately several times; prints medians and the ratios ours/theirs.

    python benches/python/compare.py --shapes cpu_small --config benches/configs/cpu_small.json --threads 2 --rounds 3
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
    ap.add_argument("--shapes", default="cpu_small")
    ap.add_argument("--config", default=os.path.join(ROOT, "benches", "configs", "cpu_small.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bench", default=os.path.join(ROOT, "target", "release", "shampoo-bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = json.load(open(args.config))
    max_dim = cfg.get("max_preconditioner_dim", 1024)
    backend = "cpu" if args.device == "cpu" else "cuda"
    ours, theirs = [], []
    for r in range(args.rounds):
        out = subprocess.run(
            [args.bench, "step", "--shapes", args.shapes, "--config", args.config, "--threads", str(args.threads),
             "--steps", str(args.steps), "--backend", backend, "--json"],
            check=True, capture_output=True, text=True).stdout
        ours.append(json.loads(out))
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "published_step.py"), "--shapes", args.shapes, "--threads",
             str(args.threads), "--max-dim", str(max_dim), "--steps", str(args.steps), "--device", args.device,
             "--json"],
            check=True, capture_output=True, text=True).stdout
        theirs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = lambda xs: statistics.median(xs)
    o_plain = med([o["shampoo"]["median_ms"] for o in ours])
    o_root = med([o["shampoo_root_inverse"]["median_ms"] for o in ours])
    o_diag = med([o["diagonal"]["median_ms"] for o in ours])
    t_plain = med([t["shampoo_ms"] for t in theirs])
    t_root = med([t["shampoo_root_inverse_ms"] for t in theirs])
    t_eigh = med([t["eigh_loop_ms"] for t in theirs])
    adam = {k: med([t[k] for t in theirs if t.get(k) is not None] or [float("nan")])
            for k in ("adam_ms", "adam_foreach_ms", "adam_fused_ms")}
    res = {
        "shapes": args.shapes, "threads": args.threads, "device": args.device, "rounds": args.rounds,
        "backend": ours[0]["backend"], "torch": theirs[0]["torch"],
        "ours_step_ms": o_plain, "ours_root_inverse_step_ms": o_root, "ours_diagonal_ms": o_diag,
        "published_way_step_ms": t_plain, "published_way_root_inverse_step_ms": t_root,
        "published_way_eigh_loop_ms": t_eigh, **{f"torch_{k}": v for k, v in adam.items()},
        "ratio_step": o_plain / t_plain, "ratio_root_inverse_step": o_root / t_root,
        "gflops_per_s": med([o["gflops_per_s"] for o in ours]),
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{args.shapes}, {args.threads} threads, {res['backend']} vs torch {res['torch']} ({args.rounds} alternating rounds, medians)")
    print(f"{'':38} {'ours ms':>9} {'published way ms':>17} {'ratio':>7}")
    print(f"{'step without root inverse':38} {o_plain:9.2f} {t_plain:17.2f} {o_plain / t_plain:7.2f}")
    print(f"{'step with every root inverse':38} {o_root:9.2f} {t_root:17.2f} {o_root / t_root:7.2f}")
    print(f"{'  of which the eigh loop (theirs)':38} {'':9} {t_eigh:17.2f}")
    print(f"{'diagonal baseline / torch.optim.Adam':38} {o_diag:9.2f} {adam['adam_ms']:17.2f} {o_diag / adam['adam_ms']:7.2f}")
    print(f"torch Adam foreach {adam['adam_foreach_ms']:.2f} ms, fused {adam['adam_fused_ms']:.2f} ms; ours {res['gflops_per_s']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
