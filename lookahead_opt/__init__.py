"""lookahead_opt: predict an optimizer's weights ``s`` steps ahead from its own update rule
(PipeOptim, arXiv 2312.00839).

.. code-block:: python

    opt = PredictiveOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    opt.step()
    w_hat = opt.predict(2)          # W_t - lr * 2 * dW_t, params untouched
    with opt.predicted(2):          # params hold the prediction inside the block
        out = model(x)
"""
from .optimizer import PredictiveOptimizer
from .redirect import redirect
from .rules import Direction, Rule, register_rule

__all__ = ["PredictiveOptimizer", "register_rule", "Rule", "Direction", "redirect"]
