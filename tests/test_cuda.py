"""The local executor on CUDA: same results as on CPU, no host sync, streams that overlap.

Run on a GPU machine with ``pytest -m cuda`` (benchmarks/gpu_checks.sh); skipped cleanly
without one.
"""
from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from pipeline_rt import Pipeline, split_by_balance
from pipeline_rt.local import LocalExecutor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DT = torch.float64
SGDM = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
ADAM = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
CLOSE = dict(rtol=1e-9, atol=1e-10)  # float64 GEMMs on GPU round differently from CPU
METHODS = [("sync", {}), ("1f1b-flush", {}), ("async", {}), ("pipedream", {}), ("2bw", {}),
           ("spectrain", {}), ("pipeoptim", {}), ("pipeoptim", {"backward": "predicted"})]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 16, dtype=DT), nn.Tanh(),
                         nn.Linear(16, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 3, dtype=DT))


def data(num=6, rows=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 5, generator=g, dtype=DT), torch.randn(rows, 3, generator=g, dtype=DT))
            for _ in range(num)]


def run(devices, method, kw, make_opt, batches):
    stages = split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1])
    pipe = Pipeline(stages, devices, make_opt, nn.functional.mse_loss, method=method, **kw)
    losses = pipe.train(batches)
    return losses, [p.detach().cpu() for s in pipe.stages for p in s.parameters()]


def device_sets():
    sets = [["cuda:0"] * 4, ["cpu", "cuda:0", "cuda:0", "cpu"]]
    if torch.cuda.device_count() >= 2:
        sets.append(["cuda:0", "cuda:0", "cuda:1", "cuda:1"])
    return sets


@pytest.mark.parametrize("devices", device_sets(), ids=lambda d: "-".join(d))
@pytest.mark.parametrize("method,kw", METHODS, ids=[m + "-".join(kw.values()) for m, kw in METHODS])
@pytest.mark.parametrize("make_opt", [SGDM, ADAM], ids=["sgdm", "adam"])
def test_cuda_matches_cpu(devices, method, kw, make_opt):
    batches = data()
    want_losses, want = run(["cpu"] * 4, method, kw, make_opt, batches)
    losses, got = run(devices, method, kw, make_opt, batches)
    assert_close(losses, want_losses, **CLOSE)
    for p, q in zip(got, want):
        assert_close(p, q, **CLOSE)


@pytest.mark.parametrize("method", ["pipeoptim", "pipedream", "2bw"])
def test_no_host_sync_on_cuda(method, monkeypatch):
    """From the first action to the last nothing waits for the device (the losses are read
    once, after the loop, in ``_end``)."""
    stages = split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1])
    pipe = Pipeline(stages, ["cuda:0"] * 4, SGDM, nn.functional.mse_loss, method=method, track_error=True)
    begin, end = LocalExecutor._begin, LocalExecutor._end

    def guarded_begin(self, run):
        begin(self, run)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def unguarded_end(self, run, ok):
        torch.cuda.set_sync_debug_mode("default")
        return end(self, run, ok)

    monkeypatch.setattr(LocalExecutor, "_begin", guarded_begin)
    monkeypatch.setattr(LocalExecutor, "_end", unguarded_end)
    try:
        losses = pipe.train([(x.cuda(), y.cuda()) for x, y in data()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(v) for v in losses)


class Sleep(torch.autograd.Function):
    """Identity whose forward and backward each spin the GPU for ``cycles`` clock cycles."""

    @staticmethod
    def forward(ctx, x, cycles):
        ctx.cycles = cycles
        torch.cuda._sleep(cycles)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        torch.cuda._sleep(ctx.cycles)
        return g.clone(), None


class Sleeper(nn.Module):
    def __init__(self, cycles):
        super().__init__()
        self.cycles = cycles
        self.w = nn.Parameter(torch.ones(1, device="cuda"))

    def forward(self, x):
        return Sleep.apply(x * self.w, self.cycles)


def _timed(num_stages, cycles, minibatches):
    pipe = Pipeline([Sleeper(cycles) for _ in range(num_stages)], ["cuda:0"] * num_stages,
                    lambda ps: torch.optim.SGD(ps, lr=0.0), lambda out, y: (out - y).pow(2).mean(), method="async")
    batches = [(torch.ones(4, 1, device="cuda"), torch.zeros(4, 1, device="cuda"))] * minibatches
    pipe.train(batches[:2])  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.train(batches)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def test_stage_streams_overlap():
    """N stages on one GPU, one stream each: async 1F1B over M minibatches takes about
    (M + N - 1) stage-times on an ideal machine, against N * M if the streams serialised."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up: the first launch pays for context and module loading
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(10_000_000 * 5.0 / max(start.elapsed_time(end), 1e-3))  # about 5 ms per pass
    n, m = 4, 12
    one = _timed(1, cycles, m)
    many = _timed(n, cycles, m)
    assert one > 0.8 * 2 * m * 5e-3, f"one stage took {one:.3f}s for {m} minibatches: sleep calibration is off"
    assert many < 0.6 * n * one, f"{n} stages took {many:.3f}s, one stage {one:.3f}s: streams do not overlap"


# ----------------------------------------------------------------------------- against the oracles

import oracle  # noqa: E402
from lookahead_opt import PredictiveOptimizer  # noqa: E402

ASYNC = [("async", {}), ("pipedream", {}), ("2bw", {}), ("pipeoptim", {}),
         ("pipeoptim", {"backward": "predicted"}), ("spectrain", {})]


@pytest.mark.parametrize("method,kw", ASYNC, ids=[m + "-".join(kw.values()) for m, kw in ASYNC])
@pytest.mark.parametrize("make_opt", [SGDM, ADAM], ids=["sgdm", "adam"])
def test_cuda_async_methods_match_sequential_oracle(method, kw, make_opt):
    """Four stages on cuda:0 (one stream each) against tests/oracle.py's sequential simulation on CPU."""
    batches = data(7, 8)
    name = "pipeoptim-predicted" if kw else method
    direction = oracle.last_update
    if method == "spectrain":
        direction = oracle.state_buffer("momentum_buffer" if make_opt is SGDM else "exp_avg")
    want_losses, want = oracle.simulate(split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1]), batches, make_opt,
                                        nn.functional.mse_loss, name, direction=direction)
    losses, got = run(["cuda:0"] * 4, method, kw, make_opt, batches)
    assert_close(losses, want_losses, **CLOSE)
    for p, q in zip(got, [q for w in want for q in w]):
        assert_close(p, q, **CLOSE)


CUDA_OPTS = [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
             (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)), (torch.optim.AdamW, dict(lr=1e-2)),
             (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)), (torch.optim.NAdam, dict(lr=1e-2)),
             (torch.optim.Adagrad, dict(lr=1e-2))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls,kw", CUDA_OPTS, ids=[c.__name__ for c, _ in CUDA_OPTS])
def test_cuda_predict_matches_fallback(cls, kw, dtype):
    """The foreach chain on CUDA (closed-form rule) against the generic fallback rule (last applied
    update kept in a buffer) on the same trajectory, for tensors of several shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (33,), (3, 4, 5), ()]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    opts = []
    for rule in (None, "fallback"):
        ps = [nn.Parameter(t.to("cuda", dtype, copy=True)) for t in init]
        opts.append((ps, PredictiveOptimizer(cls(ps, **kw), rule=rule)))
    assert opts[0][1].rule.name != "fallback"
    for step in range(4):
        grads = [torch.randn(s, generator=g, dtype=torch.float64).to("cuda", dtype) for s in shapes]
        for ps, opt in opts:
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5),
           torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]
    for s in (1, 3):
        for a, b in zip(opts[0][1].predict(s), opts[1][1].predict(s)):
            assert a.device.type == "cuda"
            assert_close(a, b, **tol)


def test_cuda_fused_kernel_runs_and_equals_chain(monkeypatch):
    """On CUDA the prediction takes the fused Triton kernel (one launch per bucket) and equals the
    foreach chain to float32 rounding, for a bucket of many tensors, some spanning many programs."""
    from lookahead_opt import kernel, triton_kernel
    assert triton_kernel.AVAILABLE, "Triton is part of every CUDA build of torch"
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(n, generator=g).cuda()) for n in [1, 1000, 70_001, 8192 * 3, 5] * 20]
    opt = PredictiveOptimizer(torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1))
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).cuda()
        opt.step()
    calls = []
    real = triton_kernel.launch
    monkeypatch.setattr(triton_kernel, "launch", lambda table, key, dtype: (calls.append(len(table[2])), real(table, key, dtype)))
    fused = [t.clone() for t in opt.predict(3)]
    assert calls == [len(ps)]
    monkeypatch.setattr(kernel, "FUSED", False)
    for a, b in zip(fused, opt.predict(3)):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pipedream", "pipeoptim", "sync"])
def test_cuda_checkpoint_resume_is_exact(method, tmp_path):
    """A checkpoint cut on CUDA reads each stage's weights, activations in flight and losses
    after the stage's own stream has written them: resuming gives the uninterrupted run."""
    batches = data(num=8, rows=64)

    def go(**kw):
        stages = split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1])
        pipe = Pipeline(stages, ["cuda:0"] * 4, SGDM, nn.functional.mse_loss, method=method)
        losses = pipe.train(batches, **kw)
        return losses, [p.detach().cpu() for s in pipe.stages for p in s.parameters()]

    want_losses, want = go()
    go(checkpoint_every=3, checkpoint_dir=tmp_path)
    losses, got = go(resume_from=tmp_path / "mb000003")
    assert losses == want_losses
    for p, q in zip(got, want):
        assert torch.equal(p, q)


def test_cuda_callback_reads_each_minibatch_loss_after_the_stage_wrote_it():
    """The callback's ``info.loss`` (read on the host) is the loss train() returns, for
    every minibatch, though the last stage computes on its own stream."""
    seen = []
    stages = split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1])
    pipe = Pipeline(stages, ["cuda:0"] * 4, SGDM, nn.functional.mse_loss, method="sync", chunks=4)
    losses = pipe.train(data(num=6, rows=256), callback=lambda info: seen.append(info.loss))
    assert seen == losses
