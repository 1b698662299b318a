"""Streams and events that also exist on CPU (as no-ops), so one executor serves both.

On a CUDA device these are :class:`torch.cuda.Stream` and :class:`torch.cuda.Event`. On any
other device a :class:`CPUStream` stands in: work runs eagerly in program order, so every
event is complete as soon as it is recorded and waiting on it does nothing (torchgpipe's
``CPUStream`` placeholder).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, List, Sequence, Union

import torch

__all__ = ["CPUStream", "CPUEvent", "COMPLETE", "AnyStream", "AnyEvent", "new_stream", "use_streams", "record", "wait"]


class CPUStream:
    """Placeholder stream of a non-CUDA device: program order is stream order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __repr__(self) -> str:
        return f"CPUStream({self.device})"


class CPUEvent:
    """Placeholder event: complete when recorded."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


#: the placeholder event (every one is complete: one object serves)
COMPLETE = CPUEvent()
_NO_CONTEXT = contextlib.nullcontext()

AnyStream = Union[CPUStream, "torch.cuda.Stream"]
AnyEvent = Union[CPUEvent, "torch.cuda.Event"]


def new_stream(device: torch.device) -> AnyStream:
    """A fresh (non-default) stream on ``device``; a placeholder off CUDA."""
    if device.type == "cuda":
        return torch.cuda.Stream(device)
    return CPUStream(device)


def use_streams(*streams: AnyStream) -> ContextManager[None]:
    """Make each stream current on its own device for the block.

    Given the copy streams of both ends of a cross-device copy, the copy is ordered on them
    only (a CUDA copy between devices synchronises with the current streams of *both*).
    Placeholders are skipped (placeholders only: one shared no-op context); a stream given
    twice is entered once.
    """
    if all(isinstance(s, CPUStream) for s in streams):
        return _NO_CONTEXT
    return _entered(streams)


@contextlib.contextmanager
def _entered(streams: Sequence[AnyStream]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        seen: List[torch.cuda.Stream] = []
        for s in streams:
            if isinstance(s, CPUStream) or any(s is t for t in seen):
                continue
            seen.append(s)
            stack.enter_context(torch.cuda.stream(s))
        yield


def record(stream: AnyStream) -> AnyEvent:
    """An event marking all work enqueued on ``stream`` so far (one shared complete event
    for a placeholder)."""
    if isinstance(stream, CPUStream):
        return COMPLETE
    event = torch.cuda.Event()
    event.record(stream)
    return event


def wait(stream: AnyStream, event: AnyEvent) -> None:
    """Make later work on ``stream`` wait for ``event``: on the device, except that a CPU
    placeholder waiting for a CUDA event (a CPU stage fed by a GPU one) must block the host."""
    if isinstance(event, CPUEvent):
        return
    if isinstance(stream, CPUStream):
        event.synchronize()
        return
    stream.wait_event(event)
