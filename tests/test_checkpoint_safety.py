"""Checkpoints are data: resuming runs nothing a checkpoint file holds, a damaged file is named
with the checkpoint to fall back to, a writer killed mid-checkpoint leaves the previous one the
latest, and data differing in one element is refused.

Oracles: a payload whose unpickling creates a marker file (the marker must not exist, and the
same payload loaded the unsafe way does create one); the uninterrupted run, bit for bit, for a
resume after a killed writer; the checkpoint taken before the damaged one, by name.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_worker import Spec, _free_port, batches, pipeline, weights
from pipeline_rt import CheckpointError, DataMismatch, Pipeline, checkpoint
from pipeline_rt.batchnorm import convert_deferred_batch_norm

MINIBATCHES = 5
SPEC = Spec(world=3, minibatches=MINIBATCHES, dropout=0.2)
KINDS = ["meta.pt", "stage0.pt", "stage2.pt", "transit1.pt"]  # metadata, first and last stage, in flight


def _run(data=None, spec=SPEC, backend="local", **train):
    pipe = pipeline(spec, "pipeoptim", backend, **train.pop("pipe", {}))
    torch.manual_seed(0)  # after building: a process of the dist backend builds one stage
    losses = pipe.train(batches(MINIBATCHES) if data is None else data, **train)
    return losses, [weights(m) for m in pipe.stages]


def _assert_same(got, want) -> None:
    assert got[0] == want[0], "losses differ"
    for a, b in zip(got[1], want[1]):
        assert all(torch.equal(a[name], b[name]) for name in b), "weights differ"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An uninterrupted run and its checkpoints after 2, 4 and 5 (the end) minibatches."""
    directory = tmp_path_factory.mktemp("saved")
    want = _run(checkpoint_every=2, checkpoint_dir=directory)
    assert sorted(p.name for p in directory.iterdir()) == ["mb000002", "mb000004", "mb000005"]
    return directory, want


def _copy(saved, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "ckpt"))


class Payload:
    """Unpickling it opens (creates) ``marker``: code run by loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("kind,dump", [(kind, "torch.save") for kind in KINDS] +
                         [("meta.pt", "pickle.dump"), ("stage0.pt", "pickle.dump")])
def test_a_payload_in_any_file_is_refused_and_does_not_run(saved, tmp_path, kind, dump):
    directory = _copy(saved, tmp_path)
    path = directory / "mb000005" / kind
    obj = torch.load(path, weights_only=True)  # the genuine content, with a payload beside it
    marker = tmp_path / "payload-ran"
    tampered = {"payload": Payload(marker), "content": obj}
    if dump == "torch.save":
        torch.save(tampered, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(tampered, f)
    live = tmp_path / "live-ran"
    torch.save({"payload": Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists(), "the payload is live: loading it the unsafe way runs it"
    with pytest.raises(CheckpointError, match=rf"(?s){kind}.*mb000004"):  # the file, and where to fall back to
        _run(resume_from=directory / "mb000005")
    assert not marker.exists()
    if dump == "torch.save":  # a checkpoint that carries code is not silently passed over for an older one
        with pytest.raises(CheckpointError, match="nothing in it ran"):
            checkpoint.latest(directory)
    assert not marker.exists()


def _flip_a_tensor_byte(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        record = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name, extra = (int.from_bytes(f.read(2), "little") for _ in range(2))
        at = record.header_offset + 30 + name + extra + record.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "one byte flipped"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_file_is_named_with_the_checkpoint_to_fall_back_to(saved, tmp_path, kind, damage):
    directory = _copy(saved, tmp_path)
    path = directory / "mb000005" / kind
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8).tolist()))
    else:
        _flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match=rf"(?s)cannot use {path}.*resume from {directory / 'mb000004'}"):
        _run(resume_from=directory / "mb000005")
    assert checkpoint.latest(directory) == directory / "mb000004", "latest() skips what cannot be read"


def test_a_checkpoint_of_an_older_format_is_refused_by_name(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    for folder in directory.iterdir():
        meta = torch.load(folder / "meta.pt", weights_only=True)
        torch.save({**meta, "format": 2}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match=r"(?s)meta.pt: format 2, and this pipeoptim reads format 3"):
        _run(resume_from=directory / "mb000004")
    with pytest.raises(CheckpointError, match=r"(?s)no complete checkpoint.*mb000005.meta.pt: format 2"):
        _run(resume_from=directory)


def test_resume_from_the_latest_after_a_damaged_one_is_exact(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    (directory / "mb000004" / "stage1.pt").write_bytes(b"")
    (directory / "mb000005" / "transit2.pt").write_bytes(b"\0" * 100)
    _assert_same(_run(resume_from=directory), saved[1])  # from mb000002


def _write_until(directory: str, victim: str, resume_from: str, **run) -> None:
    """Train with checkpoints into ``directory``; SIGKILL this process as it is about to
    rename ``victim`` (``mb000004/stage0.pt``) into place."""
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(victim):
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = replace
    _run(checkpoint_every=2, checkpoint_dir=directory, **({"resume_from": resume_from} if resume_from else {}), **run)


@pytest.mark.parametrize("victim,rewrite", [("mb000004/stage2.pt", False),  # the cut's first file
                                            ("mb000004/meta.pt", False),    # its last
                                            ("mb000004/stage0.pt", True)])  # over an older complete mb000004
def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_latest(saved, tmp_path, victim, rewrite):
    directory = _copy(saved, tmp_path) if rewrite else tmp_path / "ckpt"
    if rewrite:  # a run resumed from mb000002 into the same directory writes mb000004 again
        shutil.rmtree(directory / "mb000005")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pipeline_rt.pipeline"])
    writer = ctx.Process(target=_write_until, args=(str(directory), victim,
                                                    str(directory / "mb000002") if rewrite else ""))
    writer.start()
    writer.join(60)
    assert writer.exitcode == -signal.SIGKILL, "killed at the chosen file"
    assert checkpoint.latest(directory) == directory / "mb000002"
    assert list(directory.glob("mb000004/.*.tmp")), "the killed write's temporary file"
    # resumed into the same directory: it writes mb000004 again, and the killed write's leftover goes
    _assert_same(_run(resume_from=directory, checkpoint_every=2, checkpoint_dir=directory), saved[1])
    assert not list(directory.glob("*/.*.tmp"))
    assert checkpoint.latest(directory) == directory / "mb000005"


def _dist_writer(rank: int, port: int, directory: str, victim: str) -> None:
    """Rank ``rank`` of a 2-process run checkpointing into ``directory``; rank 0 is killed as
    it is about to rename ``victim`` into place."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 0:
        _write_until(directory, victim, "", spec=DIST, backend="dist")
    else:
        _run(spec=DIST, backend="dist", checkpoint_every=2, checkpoint_dir=directory)


DIST = Spec(world=2, minibatches=MINIBATCHES, dropout=0.2, timeout=20)


def test_a_dist_writer_killed_mid_checkpoint_leaves_the_previous_one_latest(tmp_path):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "pipeline_rt.pipeline", "pipeline_rt.dist"])
    port = _free_port()
    ranks = [ctx.Process(target=_dist_writer, args=(r, port, str(tmp_path), "mb000004/stage0.pt")) for r in range(2)]
    for p in ranks:
        p.start()
    ranks[0].join(60)
    ranks[1].join(30)  # it fails on its dead peer (or times out)
    for p in ranks:
        if p.is_alive():
            p.kill()
            p.join()
    assert ranks[0].exitcode == -signal.SIGKILL, "killed at the chosen file"
    assert checkpoint.latest(tmp_path) == tmp_path / "mb000002"
    # the local and the distributed runtime train alike (tests/test_dist.py): resume it locally
    _assert_same(_run(spec=DIST, resume_from=tmp_path), _run(spec=DIST))


def test_a_one_element_change_in_the_consumed_data_is_refused(tmp_path):
    """Inputs of 35 KB (summed in a grid of words) and targets of 9 KB (hashed as they are)."""
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(1100, 4, generator=g, dtype=torch.float64),
             torch.randn(1100, 1, generator=g, dtype=torch.float64)) for _ in range(MINIBATCHES)]
    _run(data, checkpoint_every=2, checkpoint_dir=tmp_path)
    _run(data, resume_from=tmp_path / "mb000004")  # the same data resumes

    def bump(t):
        t[900, 1] += 1e-12

    def nudge(t):
        t[33, 0] = torch.nextafter(t[33, 0], torch.tensor(10.0, dtype=t.dtype))

    def swap(t):
        t[5, [0, 3]] = t[5, [3, 0]]  # within one 512-byte row of the grid

    for m, part, change in ((1, 0, bump), (3, 1, nudge), (2, 0, swap)):
        other = [(x.clone(), y.clone()) for x, y in data]
        change(other[m][part])
        with pytest.raises(DataMismatch, match="differ from those of the run that saved"):
            _run(other, resume_from=tmp_path / "mb000004")


class Note:
    """An object of the user's own class."""

    def __init__(self, value: int) -> None:
        self.value = value


class NotedStepLR(torch.optim.lr_scheduler.StepLR):
    """A scheduler whose state holds a :class:`Note`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.note = Note(3)
        super().__init__(optimizer, step_size=2, gamma=0.5)


def test_state_of_a_class_of_its_own_is_refused_at_save_unless_allowed(tmp_path):
    pipe = {"lr_scheduler": NotedStepLR}
    with pytest.raises(CheckpointError, match=r"(?s)test_checkpoint_safety.Note at \['stage'\]\['scheduler'\]\['note'\]"
                                              r".*add_safe_globals"):
        _run(checkpoint_every=2, checkpoint_dir=tmp_path / "refused", pipe=pipe)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.latest(tmp_path / "refused")
    want = _run(pipe=pipe)
    with torch.serialization.safe_globals([Note]):  # the documented opt-in: trust this class
        _run(checkpoint_every=2, checkpoint_dir=tmp_path / "allowed", pipe=pipe)
        _assert_same(_run(resume_from=tmp_path / "allowed" / "mb000002", pipe=pipe), want)
    with pytest.raises(CheckpointError, match=r"(?s)stage0.pt is refused: it names test_checkpoint_safety.Note"):
        _run(resume_from=tmp_path / "allowed" / "mb000002", pipe=pipe)


def test_deferred_batch_norm_mid_minibatch_state_is_plain_data(tmp_path):
    """A cut falls while stage 0 has forwarded part of the next minibatch: its batch norm's
    partial statistics are in the checkpoint, load with weights_only, and resume exactly."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 4, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randn(12, 2, generator=g, dtype=torch.float64)) for _ in range(MINIBATCHES)]

    def run(**train):
        torch.manual_seed(0)
        stage0 = convert_deferred_batch_norm(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Tanh()).double(), 3)
        pipe = Pipeline([stage0, nn.Linear(4, 2).double()], ["cpu", "cpu"], lambda ps: torch.optim.SGD(ps, lr=0.05),
                        nn.functional.mse_loss, method="pipedream", chunks=3)
        losses = pipe.train(data, **train)
        return losses, [dict(m.state_dict()) for m in pipe.stages]

    want = run()
    run(checkpoint_every=2, checkpoint_dir=tmp_path)
    pending = torch.load(tmp_path / "mb000002" / "stage0.pt", weights_only=True)["stage"]["pending_stats"]
    assert pending["0"][0] == 1, "one micro-batch of minibatch 2 forwarded at the cut"
    _assert_same(run(resume_from=tmp_path / "mb000002"), want)
