"""pipeline_rt: asynchronous pipeline training (PipeOptim and the methods it is compared
against) on several devices of one process, or across processes.

.. code-block:: python

    from pipeline_rt import Pipeline, split_by_size
    pipe = Pipeline(split_by_size(model, 4), ["cuda:0"] * 4,
                    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                    torch.nn.functional.cross_entropy, method="pipeoptim")
    losses = pipe.train(batches)
"""
from .checkpoint import CheckpointError
from .executor import Info
from .feed import DataMismatch
from .methods import METHODS, RECOMMENDED, Method, get_method
from .partition import balance_by_size, balance_by_time, split_by_balance, split_by_size, split_by_time
from .pipeline import Pipeline
from .schedule import ScheduleError
from .split import SplitModel, split_model
from .stage import StageError

__all__ = [
    "Pipeline", "Info", "METHODS", "RECOMMENDED", "Method", "get_method",
    "split_by_balance", "split_by_size", "split_by_time", "balance_by_size", "balance_by_time",
    "split_model", "SplitModel", "StageError", "ScheduleError", "CheckpointError", "DataMismatch",
]
