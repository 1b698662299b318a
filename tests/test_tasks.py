"""Built-in tasks: deterministic given a seed, stages chain, entry points load."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline_rt import Pipeline
from pipeoptim_compare.tasks import (SHAPES, TASKS, EntryPointError, Task, corpus_text, evaluate,
                                     from_entry_point, get_task, psnr, register_task, render_shapes)

SMALL = {"teacher": {"train_size": 256, "eval_size": 64}, "charlm": {"num_batches": 4},
         "denoise": {"train_size": 128, "eval_size": 64}}


def _run(stages, x):
    for s in stages:
        x = s(x)
    return x


def test_builtin_tasks_registered():
    assert {"teacher", "charlm", "denoise"} <= set(TASKS)


@pytest.mark.parametrize("name", ["teacher", "charlm", "denoise"])
def test_deterministic_given_seed(name):
    a, b = get_task(name, depth=4, seed=3, **SMALL[name]), get_task(name, depth=4, seed=3, **SMALL[name])
    c = get_task(name, depth=4, seed=4, **SMALL[name])
    assert len(a.batches) == len(b.batches) > 0
    for (xa, ya), (xb, yb) in zip(a.batches, b.batches):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.batches[0][0], c.batches[0][0])
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))


@pytest.mark.parametrize("name", ["teacher", "charlm", "denoise"])
@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_stages_chain(name, depth):
    task = get_task(name, depth=depth, **SMALL[name])
    stages = task.split(depth)
    assert len(stages) == depth
    x, y = task.batches[0]
    out = _run(stages, x)
    loss = task.loss_fn(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # the stages are the model's own modules, cut in balanced contiguous pieces
    assert sum(len(s) for s in stages) == len(task.model)
    assert max(len(s) for s in stages) - min(len(s) for s in stages) <= 1
    ev_loss, metric = evaluate(stages, task.eval_data, task.loss_fn, task.metric)
    assert ev_loss > 0 and (0.0 <= metric <= 1.0 if name != "denoise" else math.isfinite(metric))


def test_deeper_than_default_blocks():
    task = get_task("teacher", depth=12, **SMALL["teacher"])
    assert len(task.split(12)) == 12


def test_charlm_targets_are_next_characters():
    task = get_task("charlm", depth=2, **SMALL["charlm"])
    x, y = task.batches[0]
    assert x.shape == y.shape and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(corpus_text()) > 5000
    xe, ye = task.eval_data
    assert torch.equal(xe[:, 1:], ye[:, :-1])


def test_teacher_labels_are_learnable_classes():
    task = get_task("teacher", depth=2, **SMALL["teacher"])
    ys = torch.cat([y for _, y in task.batches])
    counts = torch.bincount(ys, minlength=4)
    assert (counts > 0).all()  # every class occurs


def test_denoise_shapes_and_targets():
    task = get_task("denoise", depth=4, **SMALL["denoise"])
    x, y = task.batches[0]
    assert x.shape == y.shape == (32, 1, 16, 16) and x.dtype == y.dtype == torch.float32
    assert len(task.batches) == 4 and task.eval_data[0].shape == (64, 1, 16, 16)
    out = _run(task.split(4), x)
    assert out.shape == y.shape
    # the input is the clean target plus N(0, 0.5^2) noise: the identity scores about 0.25
    noise = x - y
    assert abs(float(noise.std()) - 0.5) < 0.02 and abs(float(noise.mean())) < 0.02
    assert abs(task.loss_fn(x, y).item() - 0.25) < 0.02
    assert psnr(y, y + 0.1) == pytest.approx(20.0, abs=1e-4)


def test_render_shapes_draws_each_shape():
    clean, kind = render_shapes(600, torch.Generator().manual_seed(0), size=16, rotate=0.0, clutter=0.0)
    assert clean.shape == (600, 1, 16, 16) and set(kind.tolist()) == set(range(len(SHAPES)))
    # every image has a shape: its brightest pixels stand clear of the background gradient
    flat = clean.flatten(1)
    assert (flat.amax(1) - flat.median(1).values > 0.3).float().mean() > 0.9
    # shapes differ: per-class mean images are not all alike (ring vs disk: a hole in the middle)
    mid = clean[:, 0, 6:10, 6:10].mean((1, 2))
    assert mid[kind == SHAPES.index("disk")].mean() > mid[kind == SHAPES.index("ring")].mean() + 0.1


def test_denoise_is_learnable():
    """Synchronous training clearly lowers the loss, well below the noisy input's own error."""
    torch.manual_seed(0)
    task = get_task("denoise", depth=2, train_size=320, eval_size=128)
    ev0, _ = evaluate(task.split(2), task.eval_data, task.loss_fn)
    pipe = Pipeline(task.split(2), ["cpu"] * 2, lambda ps: torch.optim.Adam(ps, lr=task.lr["adam"]),
                    task.loss_fn, method="sync", chunks=1)
    losses = pipe.train(task.batches)
    ev1, db = evaluate(pipe.stages, task.eval_data, task.loss_fn, task.metric)
    assert sum(losses[-2:]) / 2 < 0.3 * sum(losses[:2]) / 2
    assert ev1 < 0.3 * ev0 and ev1 < 0.1  # the noisy input itself scores 0.25
    assert db > 10


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_register_task():
    @register_task("_tiny_test")
    def tiny(depth=2, seed=0):
        model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(depth)])
        return Task("_tiny_test", model, [(torch.randn(4, 3), torch.randint(0, 3, (4,)))],
                    nn.functional.cross_entropy)
    try:
        assert get_task("_tiny_test", depth=3).split(3)[2][0].in_features == 3
    finally:
        TASKS.pop("_tiny_test")


def test_entry_point_sequential_and_stages(user_module):
    user_module("user_task_mod", """
        import torch
        from torch import nn

        def seq():
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            return model, [(torch.randn(6, 4), torch.randint(0, 2, (6,)))]

        def staged():
            return [nn.Linear(4, 8), nn.Linear(8, 1)], iter([(torch.randn(6, 4), torch.randn(6, 1))]), nn.functional.mse_loss

        def bad():
            return 3
    """)
    t = from_entry_point("user_task_mod:seq")
    assert len(t.split(3)) == 3 and t.loss_fn is nn.functional.cross_entropy
    t2 = get_task("user_task_mod:staged", depth=2)
    assert len(t2.split(2)) == 2 and t2.loss_fn is nn.functional.mse_loss and len(t2.batches) == 1
    with pytest.raises(ValueError, match="fixed stages"):
        t2.split(3)
    with pytest.raises(EntryPointError, match="returned int"):
        from_entry_point("user_task_mod:bad")
    with pytest.raises(EntryPointError, match="module:function"):
        from_entry_point("user_task_mod")


def test_entry_point_is_seeded_and_leaves_the_global_rng_alone(user_module):
    user_module("user_seed_mod", """
        import random
        import numpy as np
        import torch
        from torch import nn

        def build():
            x = torch.randn(8, 3) + random.random() + float(np.random.rand())
            return nn.Sequential(nn.Linear(3, 2)), [(x, x[:, 0].long())]
    """)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = from_entry_point("user_seed_mod:build", seed=5), from_entry_point("user_seed_mod:build", seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a.batches[0][0], b.batches[0][0])
    assert torch.equal(a.model[0].weight, b.model[0].weight)
    c = from_entry_point("user_seed_mod:build", seed=6)
    assert not torch.equal(a.batches[0][0], c.batches[0][0])


def test_evaluate_a_list_of_minibatches_as_one_pair():
    task = get_task("teacher", depth=2, **SMALL["teacher"])
    x, y = task.eval_data
    stages = task.split(2)
    whole = evaluate(stages, (x, y), task.loss_fn, task.metric, batch_size=16)
    parts = evaluate(stages, [(x[:40], y[:40]), (x[40:], y[40:])], task.loss_fn, task.metric)
    assert whole == pytest.approx(parts, rel=1e-6)


def test_building_a_task_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_task("teacher", depth=2, **SMALL["teacher"])
    assert torch.equal(torch.rand(3), expected)
