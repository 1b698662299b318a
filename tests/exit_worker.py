"""One rank of ``tests/test_torchrun_exit.py``: runs ``examples/torchrun_pipeline.py`` (with
this script's arguments) as ``__main__`` under torchrun, then checks what the example's
:func:`pipeline_rt.p2p.shutdown` promises: no gloo thread of the process group is left (so
none can still be releasing a work while the interpreter exits), and no warning that the
group could not be destroyed. Exits 3, naming what is left, otherwise (Linux: reads
``/proc/self/task``)."""
from __future__ import annotations

import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import List

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrun_pipeline.py"


def gloo_threads() -> List[str]:
    """Names of this process's threads that belong to gloo (``gloo_tcp_loop``, ``pt_gloo_runloop``)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return [n for n in names if "gloo" in n]


def main() -> None:
    sys.argv = [str(EXAMPLE), *sys.argv[1:]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    left = gloo_threads()
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if left or warned:
        print(f"rank {os.environ.get('RANK')}: after the example's shutdown(), gloo threads left: {left}; "
              f"warnings: {warned}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
