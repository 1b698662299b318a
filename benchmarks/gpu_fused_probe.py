"""Probe: can one compiled multi-tensor kernel make Adam's prediction memory-bound on a GPU?

Times, in one run and round robin, for ``--params`` float32 parameters in ``--tensors`` tensors:
``torch._foreach_copy_`` (2 passes), lookahead_opt's foreach chain for Adam (the default CUDA
path), and a ``torch.compile``d function of ``_foreach`` ops with the coefficients as a tensor
(inductor fuses the chain; no recompiles when lr or s change). Efficiency as in
predict_bandwidth.py: (4 passes / time) / (2 passes / copy time).

    python benchmarks/gpu_fused_probe.py --device cuda --params 50e6 --tensors 200
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lookahead_opt import PredictiveOptimizer


def fused_adam_predict(outs, ws, ms, vs, c):
    """out = W + c0 * m / (sqrt(v) + c1), as foreach ops with tensor coefficients."""
    den = torch._foreach_add(torch._foreach_sqrt(vs), c[1])
    upd = torch._foreach_div(torch._foreach_mul(ms, c[0]), den)
    torch._foreach_copy_(outs, torch._foreach_add(ws, upd))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device(args.device)
    per = int(args.params) // args.tensors
    ps = [torch.nn.Parameter(torch.randn(per, device=dev)) for _ in range(args.tensors)]
    opt = PredictiveOptimizer(torch.optim.Adam(ps, lr=1e-3))
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    st = [opt.base.state[p] for p in ps]
    ws = [p.detach() for p in ps]
    ms, vs = [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st]
    outs = [torch.empty_like(w) for w in ws]
    bc1, bc2 = 1 - 0.9, 1 - 0.999
    c = torch.tensor([-1e-3 * 3 / bc1 * bc2 ** 0.5, 1e-8 * bc2 ** 0.5], device=dev)
    t0 = time.perf_counter()
    compiled = torch.compile(fused_adam_predict)
    compiled(outs, ws, ms, vs, c)
    compile_s = time.perf_counter() - t0
    want = opt.predict(3)
    err = max((a - b).abs().max().item() for a, b in zip(outs, want))
    fns = {"copy": lambda: torch._foreach_copy_(outs, ws), "chain": lambda: opt.predict(3),
           "compiled": lambda: compiled(outs, ws, ms, vs, c)}

    def timed(fn):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            return a.elapsed_time(b) / 1e3
        t = time.perf_counter(); fn(); return time.perf_counter() - t

    times = {k: [] for k in fns}
    for _ in range(3):
        for f in fns.values():
            f()
    for _ in range(args.repeats):
        for k, f in fns.items():
            times[k].append(timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"params {args.params:.3g} in {args.tensors} tensors on {dev}; compile {compile_s:.1f}s; "
          f"max |compiled - chain| = {err:.3g}")
    for k in ("chain", "compiled"):
        eff = (4 / med[k]) / (2 / med["copy"])
        print(f"adam {k:9s} {med[k] * 1e3:8.3f} ms  copy {med['copy'] * 1e3:8.3f} ms  efficiency {eff:.2f}")


if __name__ == "__main__":
    main()
