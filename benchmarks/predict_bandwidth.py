"""Memory efficiency of PredictiveOptimizer.predict against a plain copy of all parameters.

Times, in the same run, ``torch._foreach_copy_`` of all parameters into a buffer (2 tensor
passes: read W, write out) and ``predict(s)`` for SGD-momentum (3 passes: W, momentum, out)
and Adam (4 passes: W, m, v, out); median of repeats, timed round-robin. Efficiency =
(bytes predict must move / its time) / (bytes the copy moves / its time); 1.0 = as fast as
memory allows.

    python benchmarks/predict_bandwidth.py [--device cuda] [--params 50e6] [--tensors 200]
        [--repeats 10] [--write benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sections import append_section  # noqa: E402
from lookahead_opt import PredictiveOptimizer  # noqa: E402
from lookahead_opt import kernel, native_kernel  # noqa: E402


def timer(device: torch.device):
    if device.type == "cuda":
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def interleaved_medians(fns, device, repeats: int):
    """Median time of each fn, timed round-robin (one of each per round) so that load from
    other processes hits all of them alike; also the median per-round ratio to fns[0]."""
    run = timer(device)
    for fn in fns:
        run(fn)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for ts, fn in zip(times, fns):
            ts.append(run(fn))
    ratios = [statistics.median(a / b for a, b in zip(ts, times[0])) for ts in times]
    return [statistics.median(ts) for ts in times], ratios


def make_params(total: float, n: int, device, dtype):
    cols = 512
    rows = max(1, int(total / n / cols))
    return [torch.nn.Parameter(torch.randn(rows, cols, device=device, dtype=dtype)) for _ in range(n)]


def stepped(opt_cls, params, **kw) -> PredictiveOptimizer:
    opt = PredictiveOptimizer(opt_cls(params, lr=1e-3, **kw))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return opt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--params", type=float, default=50e6, help="total number of parameters")
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--s", type=int, default=3)
    ap.add_argument("--kernel", choices=["auto", "foreach", "loop"], default="auto",
                    help="auto: by device (CUDA: the fused Triton kernel where it applies, else the "
                         "foreach chain; CPU: the native kernel where it applies, else per-tensor out= ops); "
                         "foreach: the multi-tensor chain only; loop: per-tensor out= ops only")
    ap.add_argument("--chunk", type=int, default=None, help="elements per chunk of the loop (default kernel.CHUNK)")
    ap.add_argument("--write", type=Path, default=None, help="append a section to this markdown file")
    args = ap.parse_args(argv)
    kernel.FOREACH = {"auto": None, "foreach": True, "loop": False}[args.kernel]
    kernel.FUSED = kernel.NATIVE = args.kernel == "auto"
    if args.chunk is not None:
        kernel.CHUNK = args.chunk
    device = torch.device(args.device)
    dtype = torch.float32
    params = make_params(args.params, args.tensors, device, dtype)
    numel = sum(p.numel() for p in params)
    weights = [p.detach() for p in params]
    dst = [torch.empty_like(p) for p in params]
    sgd = stepped(torch.optim.SGD, params, momentum=0.9)
    adam = stepped(torch.optim.Adam, params)
    cases = [("copy (_foreach_copy_)", 2, lambda: torch._foreach_copy_(dst, weights)),
             ("SGD-momentum predict", 3, lambda: sgd.predict(args.s)),
             ("Adam predict", 4, lambda: adam.predict(args.s))]
    times, ratios = interleaved_medians([c[2] for c in cases], device, args.repeats)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"## predict_bandwidth ({datetime.date.today().isoformat()})",
        "",
        f"* command: `python benchmarks/predict_bandwidth.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"* device: {dev_name}; torch {torch.__version__}; {numel / 1e6:.1f}M {str(dtype).split('.')[-1]} parameters "
        f"in {len(params)} tensors; s={args.s}; median of {args.repeats}"
        + f"; kernel {args.kernel}" + (f", chunk {kernel.CHUNK}" if args.kernel == "loop" else "")
        + ("; native kernel " + ("built" if native_kernel.available() else "unavailable")
           if device.type == "cpu" and args.kernel == "auto" else ""),
        "",
        "| operation | tensor passes | median time (ms) | GB/s | efficiency vs copy | efficiency, median per round |",
        "|---|---|---|---|---|---|",
    ]
    nbytes = numel * torch.finfo(dtype).bits // 8
    for (name, passes, _), t, r in zip(cases, times, ratios):
        eff = (passes / t) / (2 / times[0])
        lines.append(f"| {name} | {passes} | {t * 1e3:.2f} | {passes * nbytes / t / 1e9:.1f} | {eff:.2f} | "
                     f"{passes / 2 / r:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write is not None:
        append_section(args.write, text)


if __name__ == "__main__":
    main()
