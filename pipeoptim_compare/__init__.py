"""pipeoptim_compare: the ``pipeoptim compare`` harness (command line, built-in tasks and their
data). It trains one task with every pipeline method of :mod:`pipeline_rt` and every optimizer,
side by side, and uses the two libraries only through their public modules, as any user would.
"""
