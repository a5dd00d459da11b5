#!/usr/bin/env python3
"""Yardstick: Shampoo's step done the published way, with PyTorch.

Re-implements the work pattern of the published implementation
(facebookresearch/optimizers, DistributedShampoo on one device): blocks are
visited one at a time from Python; factor statistics with
`torch.tensordot` as full products and `L.mul_(b2).add_(C, alpha=1 - b2)`;
Adam grafting and the filtered gradient with `torch._foreach_*`;
preconditioning with one `tensordot` per dimension; root inverses with
`torch.linalg.eigh` per factor. Also times, alone, the loop of
`torch.linalg.eigh` over every factor and the loop of the published coupled
inverse Newton iteration over every factor (`coupled_newton_loop_ms`,
convergence read back every iteration), and `torch.optim.Adam` (and its
fused variant where available) on the same tensors.

It measures the cost of the published *pattern* with the same library the
published implementation uses, on this machine; it is not the published
code itself (which adds its own bookkeeping on top).

    python benches/python/published_step.py --shapes cpu_small --device cpu --threads 2
"""
import argparse
import json
import math
import os
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def merge_dims(shape, max_dim):
    if 0 in shape:
        return [0]
    kept = [d for d in shape if d != 1]
    if not kept:
        return [1]
    merged, cur = [], kept[-1]
    for d in reversed(kept[:-1]):
        if cur * d <= max_dim:
            cur *= d
        else:
            merged.append(cur)
            cur = d
    merged.append(cur)
    return merged[::-1]


def blocks_of(t, max_dim):
    merged = merge_dims(list(t.shape), max_dim)
    if 0 in merged:
        return []
    views = [t.view(merged)]
    for dim in range(len(merged)):
        views = [c for v in views for c in torch.split(v, max_dim, dim=dim)]
    return views


class PublishedStyleShampoo:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-12, max_dim=512,
                 graft_beta2=0.999, graft_eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.graft_beta2, self.graft_eps = graft_beta2, graft_eps
        self.max_dim = max_dim
        self.step_count = 0
        self.blocks = []
        for p in params:
            for b in blocks_of(p.detach(), max_dim):
                order = b.dim()
                self.blocks.append({
                    "order": order,
                    "factors": [torch.zeros(d, d, dtype=p.dtype, device=p.device) for d in b.shape],
                    "roots": [torch.eye(d, dtype=p.dtype, device=p.device) for d in b.shape],
                    "v": torch.zeros_like(b),
                    "m": torch.zeros_like(b),
                })

    @torch.no_grad()
    def step(self, root_inverse):
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        grads = [g for p in self.params for g in blocks_of(p.grad, self.max_dim)]
        params = [w for p in self.params for w in blocks_of(p.data, self.max_dim)]
        # factor statistics, one block at a time
        for blk, g in zip(self.blocks, grads):
            for k in range(blk["order"]):
                dims = [i for i in range(blk["order"]) if i != k]
                c = torch.tensordot(g, g, dims=(dims, dims))
                blk["factors"][k].mul_(b2).add_(c, alpha=1 - b2)
        bc2 = 1 - b2 ** t
        if root_inverse:
            for blk in self.blocks:
                e = 1.0 / (2 * blk["order"])
                for k, f in enumerate(blk["factors"]):
                    a = f / bc2 + self.eps * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
                    lam, q = torch.linalg.eigh(a)
                    lmin = lam.min()
                    if lmin < self.eps:
                        lam = lam - lmin + self.eps
                    blk["roots"][k] = q * lam.pow(-e).unsqueeze(0) @ q.T
        # Adam grafting and the filtered gradient
        vs = [blk["v"] for blk in self.blocks]
        ms = [blk["m"] for blk in self.blocks]
        torch._foreach_mul_(vs, self.graft_beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - self.graft_beta2)
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1 - b1)
        gf = torch._foreach_div(ms, 1 - b1 ** t)
        denom = torch._foreach_sqrt(torch._foreach_div(vs, 1 - self.graft_beta2 ** t))
        torch._foreach_add_(denom, self.graft_eps)
        graft = torch._foreach_div(gf, denom)
        # preconditioning, one block at a time
        pre = []
        for blk, g in zip(self.blocks, gf):
            x = g
            for r in blk["roots"]:
                x = torch.tensordot(x, r, dims=([0], [0]))
            pre.append(x)
        gn = torch._foreach_norm(graft)
        sn = torch._foreach_norm(pre)
        torch._foreach_add_(sn, 1e-16)
        scale = torch._foreach_div(gn, sn)
        torch._foreach_mul_(pre, scale)
        torch._foreach_add_(params, pre, alpha=-self.lr)


def coupled_newton_root(a, p, max_iterations=100, tolerance=1e-6):
    """The published coupled inverse Newton iteration for A^(-1/p), one
    matrix at a time, its convergence read back every iteration (as the
    published implementation does)."""
    n = a.shape[0]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    z = (p + 1) / (2 * torch.linalg.matrix_norm(a))
    x = z ** (1.0 / p) * eye
    m = z * a
    for _ in range(max_iterations):
        if torch.max(torch.abs(m - eye)).item() <= tolerance:
            break
        mp = (1 + 1.0 / p) * eye - m / p
        x = x @ mp
        m = torch.linalg.matrix_power(mp, p) @ m
    return x


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, n):
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="cpu_small")
    ap.add_argument("--shapes-file", default=os.path.join(HERE, "..", "data", "shape_sets.json"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = [e["shape"] for e in json.load(open(args.shapes_file))[args.shapes]]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.rand(s, generator=gen, dtype=torch.float64) * 0.2 - 0.1).to(dtype).to(args.device)) for s in shapes]
    # Two gradient sets, used alternately, as `shampoo-bench step` does: with
    # one fixed gradient a factor's rank would stay at most the block's
    # other dimension (256 of 512 for a 512x256 block), and a rank-deficient
    # matrix makes the eigendecomposition much cheaper (deflation) than the
    # full-rank factors of a real run.
    grad_sets = [[(torch.rand(s, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype).to(args.device)
                  for s in shapes] for _ in range(2)]
    turn = [0]

    def use_next_gradients():
        for p, g in zip(params, grad_sets[turn[0] % 2]):
            p.grad = g
        turn[0] += 1

    def step(root_inverse):
        use_next_gradients()
        opt.step(root_inverse)

    opt = PublishedStyleShampoo(params, max_dim=args.max_dim)
    for _ in range(3):
        step(root_inverse=True)
    plain = timed(lambda: step(False), args.device, args.steps)
    root = timed(lambda: step(True), args.device, max(3, args.steps // 2))
    eigh_only = []
    for _ in range(max(3, args.steps // 2)):
        mats = [f / 0.5 + 1e-12 * torch.eye(f.shape[0], dtype=f.dtype, device=f.device) for b in opt.blocks for f in b["factors"]]
        sync(args.device)
        t0 = time.perf_counter()
        for a in mats:
            torch.linalg.eigh(a)
        sync(args.device)
        eigh_only.append((time.perf_counter() - t0) * 1e3)

    newton_only = []
    for _ in range(max(3, args.steps // 2)):
        mats = [(f / 0.5 + 1e-12 * torch.eye(f.shape[0], dtype=f.dtype, device=f.device), 2 * b["order"])
                for b in opt.blocks for f in b["factors"]]
        sync(args.device)
        t0 = time.perf_counter()
        for a, p in mats:
            coupled_newton_root(a, p)
        sync(args.device)
        newton_only.append((time.perf_counter() - t0) * 1e3)

    res = {"set": args.shapes, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "torch": torch.__version__,
           "shampoo_ms": statistics.median(plain), "shampoo_root_inverse_ms": statistics.median(root),
           "eigh_loop_ms": statistics.median(eigh_only),
           "coupled_newton_loop_ms": statistics.median(newton_only)}
    for name, kw in [("adam_ms", {}), ("adam_foreach_ms", {"foreach": True}), ("adam_fused_ms", {"fused": True})]:
        try:
            adam = torch.optim.Adam(params, lr=1e-3, **kw)

            def adam_step():
                use_next_gradients()
                adam.step()
            for _ in range(3):
                adam_step()
            res[name] = statistics.median(timed(adam_step, args.device, args.steps))
        except (RuntimeError, TypeError) as e:  # fused Adam is not available everywhere
            res[name] = None
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v:.3f}" if isinstance(v, float) else f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
