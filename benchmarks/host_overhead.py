"""Host (Python) overhead of prediction and of the local pipeline runtime, on CPU.

Two measurements where the device work is tiny and the host is the bottleneck:

* ``PredictiveOptimizer.predict(3)`` over 200 tensors of 10 elements (SGD-momentum and Adam),
  on the default CPU path and on the foreach chain (``kernel.FOREACH = True``, the path CUDA
  takes), repeated without a step (the kept plan) and right after a step (rebuilt);
* ``Pipeline.train`` of 8 stages of one ``Linear(4, 4)`` each on CPU (4 minibatches of 16
  rows, 8 micro-batches each, SGD-momentum; and 32 minibatches of 16 rows, one micro-batch
  each, i.e. a step after every minibatch as the asynchronous methods take by default,
  SGD-momentum and Adam), in microseconds per action of the plan, next to the same torch
  work without a runtime (forwards from detached leaves, backwards, optimizer steps): the
  difference is the runtime's own overhead.

``--baseline REV`` also measures the code of git revision ``REV`` (extracted under other
package names), interleaved with the working tree's in the same process (medians of
``--rounds`` rounds of CPU time), so that a machine shared with other jobs affects both alike.
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._sections import provenance, write_section  # noqa: E402


def baseline(rev: str, into: Path) -> Tuple[object, object]:
    """``rev``'s lookahead_opt and pipeline_rt, imported as lookahead_base and pipeline_base."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lookahead_opt", "pipeline_rt"],
                         check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    names = {"lookahead_opt": "lookahead_base", "pipeline_rt": "pipeline_base"}
    for old, new in names.items():
        (into / old).rename(into / new)
    pattern = re.compile(r"\b(lookahead_opt|pipeline_rt)\b")
    for f in into.rglob("*.py"):
        f.write_text(pattern.sub(lambda m: names[m.group(1)], f.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module("lookahead_base"), importlib.import_module("pipeline_base")


def timed(f: Callable[[], None]) -> Callable[[], float]:
    """``f`` returning the CPU seconds it took."""
    def run() -> float:
        t = time.process_time()
        f()
        return time.process_time() - t
    return run


def interleaved(fns: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, float]:
    """Median of the seconds each function reports, the functions run in turn each round."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(f())
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def predictor(la, cls, kw) -> object:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(10, generator=g)) for _ in range(200)]
    opt = la.PredictiveOptimizer(cls(ps, **kw))
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(10, generator=g)
        opt.step()
    return opt


def predictions(la, opt, foreach, after_step: bool, n: int = 20) -> Callable[[], float]:
    """``n`` calls of ``opt.predict(3)`` (each after a step, not timed, if ``after_step``)."""
    def run() -> float:
        la.kernel.FOREACH = foreach
        spent = 0.0
        for _ in range(n):
            if after_step:
                opt.step()  # the gradients stay: a step with new state values
            t = time.process_time()
            opt.predict(3)
            spent += time.process_time() - t
        la.kernel.FOREACH = None
        return spent / n
    return run


def predict_rows(versions: Dict[str, Tuple[object, object]], rounds: int) -> List[str]:
    rows = []
    for name, cls, kw in (("SGD-momentum", torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                          ("Adam", torch.optim.Adam, dict(lr=1e-3))):
        for path, foreach in (("default (CPU: native kernel, else loop)", None), ("foreach chain", True)):
            for when in ("repeated", "after a step"):
                fns = {v: predictions(la, predictor(la, cls, kw), foreach, when == "after a step")
                       for v, (la, _) in versions.items()}
                t = interleaved(fns, rounds)
                rows.append(f"| predict(3), {name}, 200 x 10, {path}, {when} | "
                            + " | ".join(f"{t[v] * 1e3:.3f} ms" for v in versions) + " |")
    return rows


OPTIMIZERS = {"SGD-m": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
              "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}


def pipe(pr, method: str, optimizer: str, chunks: int) -> object:
    torch.manual_seed(0)
    stages = [torch.nn.Linear(4, 4) for _ in range(8)]
    return pr.Pipeline(stages, ["cpu"] * 8, OPTIMIZERS[optimizer], torch.nn.functional.mse_loss, method=method,
                       chunks=chunks)


def floor(stages, opts, batches, chunks: int) -> None:
    """The pipeline's torch work without a runtime."""
    for x, y in batches:
        for xm, ym in zip(x.chunk(chunks), y.chunk(chunks)):
            acts = []
            for s in stages:
                xm = xm.detach().requires_grad_(True)
                acts.append((xm, s(xm)))
            loss = torch.nn.functional.mse_loss(acts[-1][1], ym) / chunks
            g = None
            for k in reversed(range(len(stages))):
                xk, out = acts[k]
                if g is None:
                    torch.autograd.backward(loss)
                else:
                    torch.autograd.backward([out], [g])
                g = xk.grad
        for o in opts:
            o.step()
            o.zero_grad()


def pipeline_rt_now() -> object:
    import pipeline_rt
    return pipeline_rt


def pipeline_rows(versions: Dict[str, Tuple[object, object]], rounds: int) -> List[str]:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)) for _ in range(4)]
    rows = []
    for chunks, optimizer, methods in ((8, "SGD-m", ("pipeoptim", "pipedream", "sync")),
                                       (1, "SGD-m", ("pipeoptim", "pipedream")), (1, "Adam", ("pipeoptim", "pipedream"))):
        data = batches if chunks > 1 else batches * 8  # the same number of micro-batches
        torch.manual_seed(0)
        fstages = [torch.nn.Linear(4, 4) for _ in range(8)]
        fopts = [OPTIMIZERS[optimizer](s.parameters()) for s in fstages]
        for method in methods:
            pipes = {v: pipe(pr, method, optimizer, chunks) for v, (_, pr) in versions.items()}
            current = pipe(pipeline_rt_now(), method, optimizer, chunks)
            actions = sum(len(a) for a in current.schedule.finite(len(data)).actions)  # the same for every version
            fns = {v: timed(lambda p=p: p.train(data)) for v, p in pipes.items()}
            fns["torch work alone"] = timed(lambda: floor(fstages, fopts, data, chunks))
            t = interleaved(fns, rounds)
            us = {k: v / actions * 1e6 for k, v in t.items()}
            base = us.pop("torch work alone")
            rows.append(f"| Pipeline.train, {method}, {optimizer}, 8 x Linear(4, 4), {chunks} micro-batch(es) per "
                        f"minibatch, {actions} actions: us/action (runtime overhead above {base:.1f} us of torch work) | "
                        + " | ".join(f"{us[v]:.1f} ({us[v] - base:.1f})" for v in versions) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="git revision to measure against, interleaved")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", choices=("predict", "pipeline"), help="measure one of the two parts")
    ap.add_argument("--write", action="store_true", help="write the section 'host overhead' of RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import lookahead_opt
    import pipeline_rt
    versions: Dict[str, Tuple[object, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            versions[f"before ({args.baseline})"] = baseline(args.baseline, Path(tmp))
        versions["after (working tree)"] = (lookahead_opt, pipeline_rt)
        head = "| measurement | " + " | ".join(versions) + " |\n|---|" + "---|" * len(versions) + "\n"
        rows = (predict_rows(versions, args.rounds) if args.only != "pipeline" else []) + \
            (pipeline_rows(versions, args.rounds) if args.only != "predict" else [])
    table = head + "\n".join(rows) + "\n"
    print(table)
    if args.write:
        text = ("## host overhead: prediction and the local runtime's per-action work (CPU)\n\n"
                + provenance("cpu") + f"* medians of {args.rounds} interleaved rounds of CPU time\n\n" + table
                + "\n`after a step` rebuilds the kept prediction plan (directions recomputed); "
                  "`repeated` reuses it. The runtime overhead is the time per action above the same "
                  "torch work done without a runtime (in brackets).\n")
        write_section(ROOT / "benchmarks" / "RESULTS.md", "host overhead", text)


if __name__ == "__main__":
    main()
