"""One multi-tensor pass for the prediction on CPU, compiled on this machine.

On CPU the per-tensor ``out=`` ops of :mod:`lookahead_opt.kernel` read and write each operand
once per op; for Adam (``sqrt``, ``add``, ``addcdiv``) that is still three passes, and each
tensor costs a few op dispatches. This kernel (``_native.c``, next to this file) evaluates a
whole bucket in one call and one pass, its tensors cut into blocks shared by
``torch.get_num_threads()`` OpenMP threads, one fused loop per form:

.. code-block:: text

    out = W * wscale + sum_j b_j P_j + sum_k (a_k N_k) / ((D + inner)^p + eps) + shift

with ``p`` in {1/2, 1} (or no ``D``), at most two ``N_k`` and two ``P_j``: SGD and its momentum
forms, Adam/AdamW/NAdam/RAdam, RMSprop, Adagrad, Adadelta. Each operation is done in the
tensor's dtype, in the order and with the rounding of the ``out=`` ops it replaces (``addcdiv``
as ``out + (a*N)/tmp``, ``add`` with ``alpha`` as a fused multiply-add, as PyTorch's vectorised
CPU kernels do): without a denominator the result equals theirs bit for bit; with one it is the
IEEE result, which can differ from theirs in the last bit because ``torch.sqrt`` on CPU is not
always correctly rounded. float32 and float64, contiguous tensors of one dtype; the rate form
(bounds, caps), other powers and other dtypes keep the per-tensor ops.

It is built the first time it is needed, with the C compiler of the machine (``$CC``, else
``cc``, ``gcc`` or ``clang``; ``-O3 -march=native -fopenmp``; about half a second) into
``$LOOKAHEAD_OPT_CACHE`` (default ``~/.cache/lookahead_opt``, else the temporary directory),
named by a hash of the source, the compiler, the flags and the CPU, and loaded with
:mod:`ctypes`. Without a compiler, or with ``LOOKAHEAD_OPT_NATIVE=0`` in the environment,
:func:`available` is ``False`` and the per-tensor ops run. Used automatically on CPU (see
:data:`lookahead_opt.kernel.NATIVE`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .launcher import fits

__all__ = ["available", "supports", "table", "launch", "mode", "BLOCK", "MIN_PARALLEL"]

log = logging.getLogger(__name__)

#: Elements per block handed to one thread.
BLOCK: int = 1 << 16

#: Buckets of fewer elements run on the calling thread only (starting threads costs more).
MIN_PARALLEL: int = 1 << 17

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off"]
_OPTIONAL = [["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []]  # tried in order
_DTYPES = {torch.float32: 0, torch.float64: 1}
_DEN = {None: 0, 1.0: 1, 0.5: 2}

_lib: Optional[ctypes.CDLL] = None
_tried = False
_pid = os.getpid()


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({ln for ln in f if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cache_dir() -> Optional[Path]:
    """``$LOOKAHEAD_OPT_CACHE``, else ``~/.cache/lookahead_opt`` (``$XDG_CACHE_HOME``), else a
    folder of this user's in the temporary directory (only if nobody else owns or can write it:
    a library planted there would be loaded): the first one that can be created and written."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lookahead_opt"
    env = os.environ.get("LOOKAHEAD_OPT_CACHE")
    uid = getattr(os, "getuid", lambda: None)()
    tmp = Path(tempfile.gettempdir()) / f"lookahead_opt-{uid}"
    for d in ([Path(env)] if env else []) + [home, tmp]:
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d == tmp and uid is not None:  # a shared folder: only our own, closed to others
                st = d.stat()
                if st.st_uid != uid or st.st_mode & 0o022:
                    continue
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    return None


def _build() -> Optional[ctypes.CDLL]:
    """Compile (once per machine, cached on disk) and load the kernel; ``None`` if impossible."""
    cc = _compiler()
    if cc is None:
        log.info("lookahead_opt: no C compiler found; CPU prediction uses per-tensor ops")
        return None
    source = _SOURCE.read_bytes()
    cache = _cache_dir()
    if cache is None:
        log.info("lookahead_opt: no writable cache directory; CPU prediction uses per-tensor ops")
        return None
    for extra in _OPTIONAL:
        flags = _FLAGS + extra
        tag = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_id().encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        so = cache / f"native-{tag}.so"
        if not so.exists():
            try:
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
                os.close(fd)
                subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE)], check=True, capture_output=True, timeout=120)
                os.replace(tmp, so)  # atomic: concurrent builders each publish a whole file
            except (OSError, subprocess.SubprocessError) as e:
                log.info("lookahead_opt: building the native kernel with %s %s failed: %s", cc, flags, e)
                if "tmp" in locals() and os.path.exists(tmp):
                    os.unlink(tmp)
                continue
        try:
            lib = ctypes.CDLL(str(so))
        except OSError as e:
            log.info("lookahead_opt: loading %s failed: %s", so, e)
            continue
        fn = lib.lookahead_predict
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        return lib
    return None


def available() -> bool:
    """Whether the kernel can run here (built on the first call; ``LOOKAHEAD_OPT_NATIVE=0``: never)."""
    global _lib, _tried
    if os.environ.get("LOOKAHEAD_OPT_NATIVE", "1") in ("0", ""):
        return False
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib is not None


def mode() -> bool:
    """Part of a :class:`~lookahead_opt.launcher.Launcher`'s verdict: whether the kernel is available."""
    return available()


def supports(key: Tuple, items: Sequence[Tuple[Tensor, ...]]) -> bool:
    """Whether a bucket (``kernel._key``'s key, its items) fits the kernel: the form of
    :func:`~lookahead_opt.launcher.fits` in float32/float64 on CPU, where the kernel is available."""
    return items[0][1].device.type == "cpu" and fits(key, items, _DTYPES, "cpu") and available()


@functools.lru_cache(maxsize=256)
def _array(ctype: Any, n: int) -> Any:
    """The ctypes array type ``ctype * n``, kept: ctypes keeps it only while it is in use, and a
    new one is a reference cycle (freed only by the cyclic garbage collector)."""
    return ctype * n


def table(items: Sequence[Tuple[Tensor, ...]], key: Tuple) -> tuple:
    """(address table, numels, total elements, number of tensors) for the bucket."""
    ncols = 2 + len(key[3]) + len(key[4]) + (key[5] is not None)
    ptrs: List[int] = [t.data_ptr() for it in items for t in it[:ncols]]
    numels = [it[1].numel() for it in items]
    cptrs = _array(ctypes.c_void_p, len(ptrs))(*ptrs)
    cnumels = _array(ctypes.c_int64, len(numels))(*numels)
    return cptrs, cnumels, sum(numels), len(items)


def launch(table: tuple, key: Tuple, dtype: torch.dtype) -> None:
    """Run the kernel over a bucket whose :func:`table` is ``table``."""
    assert _lib is not None
    cptrs, cnumels, total, nt = table
    _, _, _, alphas, plain, den, wscale, shift = key
    inner, eps = (den[1], den[2]) if den is not None else (0.0, 0.0)
    coef = _array(ctypes.c_double, 4 + len(alphas) + len(plain))(wscale, shift, inner, eps, *alphas, *plain)
    # a forked child must not use the parent's OpenMP pool (libgomp does not survive fork)
    threads = torch.get_num_threads() if total >= MIN_PARALLEL and os.getpid() == _pid else 1
    rc = _lib.lookahead_predict(_DTYPES[dtype], nt, cnumels, cptrs, len(alphas), len(plain),
                                _DEN[None if den is None else den[0]], coef, BLOCK, threads)
    if rc != 0:
        raise RuntimeError(f"lookahead_opt native kernel: error {rc} (-1: arguments out of range, -2: out of memory)")
