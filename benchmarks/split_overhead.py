"""The cost of ``split_model``: tracing, and the stage adapter's host time per forward.

A transformers GPT-2 (from a config, random weights, ``--layers`` blocks of width 32,
context 32, float32, CPU) is split into one stage per block. Printed:

* the time :func:`pipeline_rt.split_model` takes (two traces: the model as it is, and in
  eval mode), wall and CPU;
* CPU time per forward (no grad), interleaved in rounds (medians), so that a machine shared
  with other jobs affects all alike: of a middle stage (it receives the hidden states and the
  causal mask and passes the mask on) against its traced graph called directly with the same
  arguments (the difference is the adapter's routing and shape checks); and of the whole
  model through its stages in turn against the model itself (eager): the cost of running
  torch's traced pieces (graph modules) instead of the model's own code.

    python benchmarks/split_overhead.py --layers 4 --rows 8 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, List

import torch


def per_call(fn: Callable[[], Any], n: int) -> float:
    """CPU microseconds per call of ``fn``, over ``n`` calls."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel, logging
    logging.set_verbosity_error()

    from pipeline_rt import split_model
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=args.layers, n_head=4, use_cache=False,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 256, (args.rows, 32))
    w0, c0 = time.perf_counter(), time.process_time()
    stages = split_model(model, [f"transformer.h.{k}" for k in range(1, args.layers)], (ids,))
    print(f"split_model, {args.layers} stages: {time.perf_counter() - w0:.2f} s wall, "
          f"{time.process_time() - c0:.2f} s CPU (two traces)")
    with torch.no_grad():
        message = stages[0](ids)
        stage = stages[1]
        graph, route = stage._graphs[True]
        env = dict(zip(route.inputs, message))
        graph_args = [env[a[1]] if a[0] == "value" else env[a[1]].shape[a[2]] if a[0] == "size" else a[1]
                      for a in route.args]

        def chain() -> Any:
            x: Any = (ids,)
            for s in stages:
                x = s(*x)
            return x

        times: List[List[float]] = [[], [], [], []]
        for _ in range(args.rounds):
            for i, fn in enumerate((lambda: stage(*message), lambda: graph(*graph_args), chain, lambda: model(ids))):
                times[i].append(per_call(fn, args.calls))
    a, d, c, e = (statistics.median(t) for t in times)
    print(f"CPU us per forward ({args.rows} rows, no grad), medians of {args.rounds} rounds:")
    print(f"  stage 1: SplitStage {a:.0f}, its graph called directly {d:.0f}: ratio {a / d:.3f}")
    print(f"  whole model: through the {args.layers} stages {c:.0f}, the model itself {e:.0f}: ratio {c / e:.3f}")


if __name__ == "__main__":
    main()
