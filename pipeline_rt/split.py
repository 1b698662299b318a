"""Split any traceable model into pipeline stages on torch's tracer.

.. code-block:: python

    stages = split_model(model, ["transformer.h.2", "transformer.h.4", "transformer.h.6"],
                         (input_ids,))                  # example arguments, any batch size
    pipe = Pipeline(stages, ["cuda:0"] * 4, make_opt, loss_fn, method="pipeoptim")
    pipe.train(batches)
    stages.load_into(model)                              # the trained weights, back in the model

How. :func:`split_model` marks each named module with torch's
``SplitPoint.BEGINNING``, traces the model with :func:`torch.export.export` (non-strict,
dim 0 of every tensor argument one dynamic ``batch`` dimension) and splits the graph with
``torch.distributed.pipelining``'s ``Pipe``, whose submodule ``k`` is stage ``k``'s
graph, holding the model's own parameters and buffers under their original names. Each
stage is a :class:`SplitStage` around that graph which adapts it to the runtime's strict
chain (stage ``k``'s output tuple is stage ``k+1``'s input tuple):

* **Skips.** A value that a later stage needs (GPT-2's causal mask, made in stage 0 and used
  by every block) rides as an extra entry of the message tuple through the stages between,
  which pass it on unchanged. The transports make every received tensor a leaf and a
  backward returns every input's gradient, so the gradient of a skipped tensor reaches the
  stage that made it (summed over its users) under every method, locally and across ranks.
* **Sizes.** A symbolic size that the graphs pass between stages (the batch size) is not
  sent: the stage that needs it reads it off the shape of one of its own tensor inputs.
* **Batch size.** The graphs are traced with a dynamic batch dimension, so every micro-batch
  size works (the runtime's uneven split, a short last minibatch). A size the trace fixed
  (e.g. the sequence length, unless ``dynamic_shapes`` says otherwise) is checked at every
  forward, with an error naming the input and the traced shape.
* **Modes.** A trace bakes in each module's mode: ``split_model`` traces the model as it is
  (its training graph) and again with every module in eval mode (its eval graph, sharing the
  same parameters and buffers); a stage in eval mode (``Pipeline.evaluate`` / ``forward``)
  runs the eval graph. A stage made from a :class:`~torch.distributed.pipelining.Pipe` of
  your own has one graph: in eval mode it refuses to run if that graph depends on the mode
  (dropout, batch norm in training mode).
* **Batch-dependent ops.** A batch norm in training mode is a graph node, not an
  ``nn.BatchNorm``: the graph module at its place is marked ``batch_dependent = True``, so
  :func:`pipeline_rt.guards.check_batch_dependent` refuses micro-batches as it does for a
  plain ``BatchNorm``.
* **Randomness.** Whether a stage's forward draws random numbers (dropout) is read off its
  graph (ops tagged ``nondeterministic_seeded``) and marked ``draws_random`` for
  :mod:`pipeline_rt.randomness`: a stage that draws gets its own RNG stream, one that does not
  skips the swap.
* **Ties.** A parameter used by several stages (GPT-2's input embedding, stage 0, tied to its
  output projection, the last stage) is copied into each by torch's ``Pipe``; ``split_model``
  puts the model's one ``nn.Parameter`` back in every stage that uses it (under each of the
  model's names for it: a tie appears in ``state_dict()`` under both). ``Pipeline`` finds it
  by identity and trains it as a tie (:mod:`pipeline_rt.ties`): exact under the flush methods
  (``sync``, ``1f1b-flush``: one step on the sum of the stages' gradients), refused under the
  asynchronous ones; with ``backend="dist"`` each rank's copy is kept identical (broadcast,
  gradient all-reduce before STEP).

The last stage returns what the model returns (e.g. a transformers ``ModelOutput`` with
``logits``), so ``loss_fn(output, target)`` sees what it sees in single-device training.
The first stage's input is the model's tensor arguments, flattened in order (``example_args``
then the values of ``example_kwargs``): a minibatch's input is that tensor (one argument) or
tuple. Non-tensor arguments are fixed at their example values.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

__all__ = ["split_model", "SplitModel", "SplitStage", "from_pipe", "as_stages", "batch_dependent_nodes"]

#: how a stage gets one argument of its graph: ("value", name) a value of the message,
#: ("size", name, dim) a size read off a tensor of the message, ("const", value) fixed
Arg = Tuple[Any, ...]

#: batch-norm-like ATen ops whose training-mode forward mixes rows of the batch (and updates
#: running statistics); the flag is their ``training`` argument where they have one
_BATCH_NORM_OPS = frozenset({
    "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    "_batch_norm_with_update", "_batch_norm_with_update_functional", "_batch_norm_impl_index",
    "cudnn_batch_norm", "miopen_batch_norm", "instance_norm"})
@dataclass(frozen=True)
class _Route:
    """How stage ``k`` adapts its graph to the chain."""

    inputs: Tuple[str, ...]   # the values of the incoming message, in order
    args: Tuple[Arg, ...]     # per placeholder of the graph
    produces: Tuple[str, ...]  # the graph's outputs (one name: a single output)
    outputs: Tuple[str, ...]  # the values of the outgoing message (the last stage: the model's output leaves)
    single: bool              # the graph returns one value, not a tuple
    fixed: Tuple[Tuple[int, Tuple[Optional[int], ...]], ...]  # (message index, traced shape; None: dynamic)


class SplitStage(nn.Module):
    """One stage of a split model: its graph (and eval graph), adapted to the chain.

    Its parameters and buffers are the model's own, under the model's names
    (``stage.state_dict()`` keys are keys of ``model.state_dict()``).
    """

    def __init__(self, index: int, num_stages: int, graph: fx.GraphModule, route: _Route,
                 eval_graph: Optional[fx.GraphModule] = None, eval_route: Optional[_Route] = None,
                 out_spec: Optional[pytree.TreeSpec] = None) -> None:
        super().__init__()
        self.index, self.num_stages, self.out_spec = index, num_stages, out_spec
        # the graph's children become this module's, so that names are the model's
        for name, child in graph.named_children():
            self.add_module(name, child)
        for name, p in graph.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in graph.named_buffers(recurse=False):
            self.register_buffer(name, b)
        # not submodules: the train graph's children are ours, the eval graph shares their tensors
        self._graphs: Dict[bool, Tuple[fx.GraphModule, _Route]] = {True: (graph, route)}
        if eval_graph is not None and eval_route is not None:
            self._graphs[False] = (eval_graph, eval_route)
        self._mode_dependent = _mode_dependent(graph)  # (matters only without an eval graph)
        self._mark_batch_dependent(graph)
        for g, _ in self._graphs.values():
            for m in g.modules():  # torch's unflattened modules run their generated code, not fx.Interpreter
                if hasattr(m, "_run_with_interpreter"):
                    m._run_with_interpreter = False  # type: ignore[assignment]
        # whether a forward may draw random numbers, read off the graphs (pipeline_rt.randomness:
        # each module's mark is its own; this module's is the root graph's, which is not a child)
        self.draws_random = any(_draws(n) for n in graph.graph.nodes)
        for m in self.modules():
            own = getattr(m, "graph", None)
            if isinstance(own, fx.Graph):
                m.draws_random = any(_draws(n) for n in own.nodes)  # type: ignore[assignment]

    def forward(self, *message: Optional[Tensor]) -> Any:
        graph, route = self._graph()
        if len(message) != len(route.inputs):
            raise ValueError(f"split stage {self.index} takes {len(route.inputs)} tensors ({', '.join(route.inputs)}) "
                             f"but was given {len(message)}: give the model's tensor arguments in order")
        for i, shape in route.fixed:
            _check_shape(self.index, route.inputs[i], message[i], shape)
        env: Dict[str, Any] = dict(zip(route.inputs, message))
        args = [env[a[1]] if a[0] == "value" else env[a[1]].shape[a[2]] if a[0] == "size" else a[1]
                for a in route.args]
        out = graph(*args)
        env.update(zip(route.produces, (out,) if route.single else out))
        values = [env[n] for n in route.outputs]
        if self.index < self.num_stages - 1:
            return tuple(values)
        if self.out_spec is not None:
            return pytree.tree_unflatten(values, self.out_spec)
        return values[0] if len(values) == 1 else tuple(values)

    def _graph(self) -> Tuple[fx.GraphModule, _Route]:
        if self.training:
            return self._graphs[True]
        if False not in self._graphs:
            if self._mode_dependent:
                raise RuntimeError(
                    f"split stage {self.index} is in eval mode, but it has one graph, traced in training mode,\n"
                    f"with dropout or batch norm baked in: in eval mode it would still drop, normalise over the\n"
                    f"batch and update running statistics.\n"
                    f"Fix: split with pipeline_rt.split_model(model, split_points, example_args), which also traces\n"
                    f"an eval graph, instead of torch's pipeline().")
            return self._graphs[True]
        return self._graphs[False]

    def _mark_batch_dependent(self, graph: fx.GraphModule) -> None:
        """Mark the module at each training-mode batch norm of ``graph`` (see :mod:`pipeline_rt.guards`)."""
        for path, node in batch_dependent_nodes(graph):
            owner: nn.Module = self
            if path:
                try:
                    owner = self.get_submodule(path)
                except AttributeError:
                    owner = self
            owner.batch_dependent = True  # type: ignore[assignment]

    def _apply(self, fn: Any, recurse: bool = True) -> "SplitStage":
        super()._apply(fn, recurse)
        self._relink()
        return self

    def _relink(self) -> None:
        """The graphs read this module's parameters and buffers (``.to()`` replaces buffers,
        and the eval graph has its own module tree); the device baked into the graphs'
        factory calls (``torch.arange(..., device=...)``) follows them."""
        mine: Dict[str, Tensor] = dict(self.named_parameters(remove_duplicate=False))
        mine.update(self.named_buffers(remove_duplicate=False))
        for graph, _ in self._graphs.values():
            for name, t in list(graph.named_parameters(remove_duplicate=False)) + \
                    list(graph.named_buffers(remove_duplicate=False)):
                if name in mine and mine[name] is not t:
                    owner, _, attr = name.rpartition(".")
                    holder = graph.get_submodule(owner) if owner else graph
                    table: Dict[str, Any] = holder._parameters if isinstance(t, nn.Parameter) else holder._buffers
                    table[attr] = mine[name]
        devices = {t.device for t in mine.values()}
        if len(devices) == 1:
            from torch.distributed.pipelining._IR import _modify_graph_op_device
            device = devices.pop()
            for graph, _ in self._graphs.values():
                _modify_graph_op_device(graph, device)


class SplitModel(List[SplitStage]):
    """The stages of :func:`split_model`, in order (a list: give it to ``Pipeline``).

    Attributes:
        model: the model split (its parameters are the stages' own: training the stages
            trains it in place, as long as they stay on the model's devices).
        split_points: the module names each stage after the first begins with.
    """

    def __init__(self, stages: Sequence[SplitStage], model: Optional[nn.Module],
                 split_points: Sequence[str]) -> None:
        super().__init__(stages)
        self.model, self.split_points = model, list(split_points)

    def state_dict(self) -> Dict[str, Tensor]:
        """The stages' parameters and buffers under the model's names (a state dict of the
        model, less any tensor no stage holds)."""
        out: Dict[str, Tensor] = {}
        for s in self:
            out.update(s.state_dict())
        return out

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the stages' parameters and buffers into ``model`` (the model split, or
        another instance of it) by name, onto the model's devices; returns ``model``.

        With ``backend="dist"`` each rank holds one trained stage: gather the stages'
        ``state_dict()`` s (same names as the model's) and ``model.load_state_dict(merged)``.
        """
        own = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, t in self.state_dict().items():
                if name not in own:
                    raise KeyError(f"the model has no parameter or buffer {name!r}; load_into needs the model "
                                   f"that was split (or another instance of it)")
                if own[name] is not t:
                    own[name].copy_(t)
        return model


def split_model(model: nn.Module, split_points: Sequence[str], example_args: Sequence[Any],
                example_kwargs: Optional[Dict[str, Any]] = None, *,
                dynamic_shapes: Any = None) -> SplitModel:
    """Split ``model`` into ``len(split_points) + 1`` stages, stage ``k+1`` beginning with
    the module named ``split_points[k]`` (names of ``model.named_modules()``, in the order
    the forward calls them), on torch's tracer (see the module documentation).

    Args:
        model: any module :func:`torch.export.export` can trace (non-strict mode). For a
            transformers model, pass ``use_cache=False`` in its config (a cache object is
            not a tensor).
        split_points: where the stages after the first begin.
        example_args, example_kwargs: an example input, as the model is called:
            ``model(*example_args, **example_kwargs)`` (a single tensor is taken as
            ``(tensor,)``).
        dynamic_shapes: :func:`torch.export.export`'s ``dynamic_shapes`` (default: dim 0 of
            every tensor argument is one dynamic batch dimension; give more to vary, e.g.,
            the sequence length).

    Returns:
        a :class:`SplitModel`, the list of stage modules for ``Pipeline`` (local, or
        ``backend="dist"`` where every rank calls ``split_model`` alike).

    Raises:
        ValueError: a split point that is not a submodule, or that the forward does not
            reach.
        RuntimeError: the model does not trace (with torch's reason).
    """
    args = (example_args,) if isinstance(example_args, Tensor) else tuple(example_args)
    kwargs = dict(example_kwargs or {})
    names = list(split_points)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        sample = ", ".join(repr(n) for n in list(modules)[1:6])
        raise ValueError(f"split_model: {unknown} are not submodules of the model;\n"
                         f"split points are names of model.named_modules() (e.g. {sample})")
    if len(set(names)) != len(names):
        raise ValueError(f"split_model: split points repeat: {names}")
    if dynamic_shapes is None:
        small = [tuple(t.shape) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim()
                 and t.shape[0] < 2]
        if small:
            raise ValueError(f"split_model: the example's tensors of shapes {small} have fewer than 2 rows;\n"
                             f"torch.export fixes a dimension of size 0 or 1, so the batch would not be dynamic:\n"
                             f"give an example of at least 2 rows")
    shapes = _batch_shapes(model, args, kwargs) if dynamic_shapes is None else dynamic_shapes
    pipe, out_spec = _trace(model, names, args, kwargs, shapes)
    if pipe.num_stages != len(names) + 1:
        raise ValueError(f"split_model: {len(names)} split points gave {pipe.num_stages} stages, "
                         f"not {len(names) + 1}:\n"
                         f"each split point must be a module the forward calls once, in the order given")
    eval_pipe = None
    if any(m.training for m in model.modules()):
        with _all_eval(model):
            eval_pipe, _ = _trace(model, names, args, kwargs, shapes)
    leaves = pytree.tree_leaves((args, kwargs))
    stages = _stages(pipe, eval_pipe, out_spec, leaves)
    return SplitModel(stages, model, names)


def from_pipe(pipe: Any) -> SplitModel:
    """The stages of a ``Pipe`` made with torch's ``pipeline()`` (one graph each, the shapes
    of its example fixed: prefer :func:`split_model`)."""
    leaves = [None] * sum(1 for n in pipe.split_gm.graph.nodes if n.op == "placeholder")
    return SplitModel(_stages(pipe, None, None, leaves), None, [])


def as_stages(stages: Any) -> List[Any]:
    """What ``Pipeline`` accepts as ``stages``, as its list of stage specs: a torch ``Pipe``
    becomes its stages (:func:`from_pipe`); hand-written stages with declared skips are
    wired (:func:`pipeline_rt.skip.wire`); a list of traced graph modules that do not chain
    (a ``Pipe``'s submodules taken out of it) is refused."""
    from .skip import wire
    try:
        from torch.distributed.pipelining._IR import Pipe
    except ImportError:  # pragma: no cover - a torch build without torch.distributed
        Pipe = ()  # type: ignore[assignment,misc]
    if isinstance(stages, Pipe):
        return list(from_pipe(stages))
    stages = list(stages)
    _check_chain(stages)
    return wire(stages)


def batch_dependent_nodes(graph: fx.GraphModule) -> List[Tuple[str, fx.Node]]:
    """The batch-norm nodes of ``graph`` (and of its graph submodules) that normalise over the
    batch (training mode), as ``(path of the graph module holding it, node)``."""
    out = []
    for path, m in graph.named_modules():
        g = getattr(m, "graph", None)
        if not isinstance(g, fx.Graph):
            continue
        out += [(path, n) for n in g.nodes if n.op == "call_function" and _batch_dependent(n)]
    return out


# ---------------------------------------------------------------------- tracing


def _trace(model: nn.Module, names: List[str], args: Tuple[Any, ...], kwargs: Dict[str, Any],
           shapes: Any) -> Tuple[Any, pytree.TreeSpec]:
    """torch's ``Pipe`` of ``model`` cut before each of ``names``, and the structure of
    the model's output."""
    from torch.distributed.pipelining import SplitPoint
    from torch.distributed.pipelining._IR import MultiUseParameterConfig, Pipe, annotate_split_points
    with _restored_forwards(model, names):
        annotate_split_points(model, {n: SplitPoint.BEGINNING for n in names})
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as e:
            raise RuntimeError(
                f"split_model: torch.export could not trace the model ({type(e).__name__}: {_first_lines(e)}).\n"
                f"What traces and what does not, and what to do: docs/splitting.rst. Common causes:\n"
                f"- a non-tensor output (transformers: pass use_cache=False in the config);\n"
                f"- control flow on a tensor's value (rewrite with torch.where / torch.cond);\n"
                f"- code that fixes the batch size (pass dynamic_shapes=..., or split by hand).") from e
        pipe = Pipe._from_traced(model, ep, MultiUseParameterConfig.REPLICATE)
    _share_model_params(pipe, model)
    return pipe, ep.call_spec.out_spec


def _share_model_params(pipe: Any, model: nn.Module) -> None:
    """Make every stage graph hold the model's own parameter objects, by name.

    torch's ``Pipe`` deep-copies a parameter used by several stages (``pipe.replicated_params``:
    GPT-2's tied ``transformer.wte.weight`` / ``lm_head.weight``) so that each stage has its
    own. Put back the model's one parameter (under each of its names) in every stage that uses
    it: the stages then share one ``nn.Parameter``, which ``Pipeline`` trains as a tie
    (:mod:`pipeline_rt.ties`), and the model's parameters stay the stages' own."""
    own = dict(model.named_parameters(remove_duplicate=False))
    for gm in _graphs(pipe):
        for name, p in list(gm.named_parameters(remove_duplicate=False)):
            if name in own and own[name] is not p:
                owner, _, attr = name.rpartition(".")
                gm.get_submodule(owner)._parameters[attr] = own[name]
    calls = {c.target: k for k, c in enumerate(_calls(pipe))}
    for uses in pipe.replicated_params:
        held = {id(pipe.split_gm.get_submodule(s).get_parameter(n)) for s, n in uses.items()}
        if len(held) > 1:
            where = ", ".join(f"stage {calls[s]}'s {n!r}" for s, n in uses.items())
            raise ValueError(
                f"split_model: a parameter is used by several stages ({where}), and torch's tracer copied it\n"
                f"into each under a name the model does not have, so the copies cannot be made one again.\n"
                f"Fix: move the split points so that all its uses fall in one stage, or untie it.")


@contextlib.contextmanager
def _restored_forwards(model: nn.Module, names: List[str]) -> Iterator[None]:
    """``annotate_split_points`` replaces the named modules' ``forward``: put them back after."""
    saved = [(m, m.__dict__.get("forward"), m.__dict__.get("_orig_forward"))
             for m in (model.get_submodule(n) for n in names)]
    try:
        yield
    finally:
        for m, forward, orig in saved:
            for attr, old in (("forward", forward), ("_orig_forward", orig)):
                if old is None:
                    m.__dict__.pop(attr, None)
                else:
                    m.__dict__[attr] = old


@contextlib.contextmanager
def _all_eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _batch_shapes(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """``dynamic_shapes`` with dim 0 of every tensor argument one dimension ``batch``."""
    batch = torch.export.Dim("batch")

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, Tensor) and x.dim() > 0 else None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _first_lines(e: BaseException, n: int = 6) -> str:
    return "\n".join(str(e).strip().splitlines()[:n])


# ---------------------------------------------------------------------- routes


def _stages(pipe: Any, eval_pipe: Any, out_spec: Optional[pytree.TreeSpec], leaves: List[Any]) -> List[SplitStage]:
    n = pipe.num_stages
    routes = _routes(pipe, leaves)
    eval_routes = _routes(eval_pipe, leaves) if eval_pipe is not None else [None] * n
    graphs = _graphs(pipe)
    eval_graphs = _graphs(eval_pipe) if eval_pipe is not None else [None] * n
    return [SplitStage(k, n, graphs[k], routes[k], eval_graphs[k], eval_routes[k], out_spec) for k in range(n)]


def _calls(pipe: Any) -> List[fx.Node]:
    """The stages' calls in the split graph, in order."""
    return [n for n in pipe.split_gm.graph.nodes if n.op == "call_module"]


def _graphs(pipe: Any) -> List[fx.GraphModule]:
    """The stages' graph modules, in order."""
    return [pipe.split_gm.get_submodule(c.target) for c in _calls(pipe)]


def _routes(pipe: Any, leaves: List[Any]) -> List[_Route]:
    """Read the split graph: which stage makes each value, which stages use it; every tensor
    a later stage uses rides in the messages from its maker to its last user (the model's
    inputs enter at stage 0, its output leaves from the last)."""
    top = pipe.split_gm.graph
    calls = _calls(pipe)
    placeholders = [n for n in top.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        raise ValueError(f"split_model: the traced model takes {len(placeholders)} inputs but the example has "
                         f"{len(leaves)} leaves")
    const = {p.name: v for p, v in zip(placeholders, leaves) if v is not None and not isinstance(v, Tensor)}
    made: Dict[str, int] = {p.name: 0 for p in placeholders if p.name not in const}  # inputs enter at stage 0
    order = [p.name for p in placeholders if p.name not in const]
    last_use: Dict[str, int] = {}
    tensors = set(order)
    produces: List[Tuple[str, ...]] = []
    singles: List[bool] = []
    all_args: List[Tuple[Arg, ...]] = []
    fixed_of: List[Dict[str, Tuple[Optional[int], ...]]] = []
    for k, (call, gm) in enumerate(zip(calls, _graphs(pipe))):
        outs = _graph_outputs(gm)
        single = not isinstance(outs, (tuple, list))
        if single:
            produced: Tuple[str, ...] = (call.name,)
            kinds = [outs]
        else:
            index = {u.args[1]: u.name for u in call.users if u.op == "call_function" and u.target is operator.getitem}
            produced = tuple(index.get(i, f"{call.name}.unused{i}") for i in range(len(outs)))
            kinds = list(outs)
        for name, node in zip(produced, kinds):
            made[name] = k
            order.append(name)
            if isinstance(_val(node), Tensor):
                tensors.add(name)
        args, fixed = _stage_args(k, gm, call, const)
        for arg in args:
            if arg[0] in ("value", "size"):
                last_use[arg[1]] = max(last_use.get(arg[1], 0), k)
        produces.append(produced)
        singles.append(single)
        all_args.append(tuple(args))
        fixed_of.append(fixed)
    result = next(n for n in top.nodes if n.op == "output").args[0]
    result = list(result) if isinstance(result, (tuple, list)) else [result]
    final = tuple(r.name for r in result)
    n = len(calls)
    for name in final:
        last_use[name] = n - 1
    carried = [tuple(v for v in order if v in tensors and made[v] <= k < last_use.get(v, -1)) for k in range(n)]
    routes = []
    for k in range(n):
        inputs = tuple(p.name for p in placeholders if p.name not in const) if k == 0 else carried[k - 1]
        outputs = final if k == n - 1 else carried[k]
        routes.append(_Route(inputs, all_args[k], produces[k], outputs, singles[k],
                             tuple((inputs.index(v), shape) for v, shape in fixed_of[k].items() if v in inputs)))
    return routes


def _stage_args(k: int, gm: fx.GraphModule, call: fx.Node,
                const: Dict[str, Any]) -> Tuple[List[Arg], Dict[str, Tuple[Optional[int], ...]]]:
    """How stage ``k`` gets each argument of its graph ``gm`` (called as ``call`` in the
    split graph), and the traced shape of each tensor value it takes (``None``: dynamic)."""
    phs = [p for p in gm.graph.nodes if p.op == "placeholder"]
    args: List[Arg] = []
    fixed: Dict[str, Tuple[Optional[int], ...]] = {}
    for ph, a in zip(phs, call.args):
        if not isinstance(a, fx.Node):
            args.append(("const", a))
        elif a.name in const:
            args.append(("const", const[a.name]))
        elif isinstance(_val(ph), (torch.SymInt, int)) and not isinstance(_val(ph), bool):
            args.append(_size(k, ph, _val(ph), phs, call.args))
        else:
            args.append(("value", a.name))
            if isinstance(_val(ph), Tensor):
                fixed[a.name] = tuple(d if isinstance(d, int) else None for d in _val(ph).shape)
    return args, fixed


def _graph_outputs(gm: fx.GraphModule) -> Any:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _size(k: int, ph: fx.Node, val: Any, phs: List[fx.Node], call_args: Sequence[Any]) -> Arg:
    """How stage ``k`` gets the size ``ph`` without receiving it: off a tensor input's shape."""
    if isinstance(val, int):
        return ("const", val)
    expr = val.node.expr
    for other, a in zip(phs, call_args):
        t = _val(other)
        if isinstance(t, Tensor) and isinstance(a, fx.Node):
            for d, size in enumerate(t.shape):
                if isinstance(size, torch.SymInt) and size.node.expr == expr:
                    return ("size", a.name, d)
    raise ValueError(f"split_model: stage {k} needs the size {expr} (input {ph.name!r}), which none of its tensor "
                     f"inputs carries as a dimension; move the split point (a size is read off the stage's inputs, "
                     f"not sent)")


def _check_shape(k: int, name: str, t: Optional[Tensor], shape: Tuple[Optional[int], ...]) -> None:
    if t is None:
        return
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        traced = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(
            f"split stage {k}: input {name!r} has shape {tuple(t.shape)}, but the stage was traced for shapes "
            f"{traced}\n(* = any size): the trace fixed the other sizes.\n"
            f"Fix: split with split_model, which makes dim 0 (the batch) dynamic, and pass dynamic_shapes=...\n"
            f"for other dimensions (e.g. the sequence length).")


def _op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", "")
    return str(name).split(".")[-1]


def _batch_dependent(node: fx.Node) -> bool:
    if _op_name(node) not in _BATCH_NORM_OPS:
        return False
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    flag = "use_input_stats" if "use_input_stats" in names else "training"
    if flag not in names:
        return True  # the *_with_update ops: always training mode
    i = names.index(flag)
    value = node.kwargs[flag] if flag in node.kwargs else node.args[i] if i < len(node.args) else True
    if flag == "use_input_stats":  # instance norm: batch-dependent only through its running statistics
        running = node.args[3] if len(node.args) > 3 else node.kwargs.get("running_mean")
        return bool(value) and running is not None
    return bool(value)


def _draws(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (an ATen op tagged ``nondeterministic_seeded``:
    dropout, bernoulli, rand...)."""
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _mode_dependent(graph: fx.GraphModule) -> bool:
    """Whether ``graph`` holds an op whose traced form depends on the mode (a random draw such
    as dropout, a training-mode batch norm)."""
    for _, m in graph.named_modules():
        g = getattr(m, "graph", None)
        if isinstance(g, fx.Graph) and any(_draws(n) or n.op == "call_function" and _batch_dependent(n)
                                           for n in g.nodes):
            return True
    return False


def _check_chain(stages: List[Any]) -> None:
    """Refuse traced graph modules (a ``Pipe``'s submodules) whose inputs do not chain."""
    graphs = [s if isinstance(s, fx.GraphModule) else None for s in stages]
    for k in range(1, len(stages)):
        prev, cur = graphs[k - 1], graphs[k]
        if prev is None or cur is None:
            continue
        takes = [p.name for p in cur.graph.nodes if p.op == "placeholder"]
        outs = _graph_outputs(prev)
        gives = len(outs) if isinstance(outs, (tuple, list)) else 1
        sizes = [p.name for p in cur.graph.nodes if p.op == "placeholder"
                 if isinstance(p.meta.get("val"), torch.SymInt)]
        if len(takes) != gives or sizes:
            raise ValueError(
                f"stages {k - 1} and {k} are traced graph modules that do not chain: stage {k} takes {len(takes)} "
                f"inputs ({', '.join(takes)}) but stage {k - 1} returns {gives}"
                + (f", and {sizes} are sizes, not tensors" if sizes else "") + ".\n"
                f"Values skip stages in a traced model (e.g. an attention mask made in stage 0); "
                f"pass torch's Pipe itself as stages, or split with "
                f"pipeline_rt.split_model(model, split_points, example_args), which routes them.")
