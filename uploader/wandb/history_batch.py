"""Hand logged rows to the W&B client a batch at a time instead of one round trip per row.

`run.log` builds a record for its row and hands it to the client's asyncio thread, then waits until that
thread has written it to wandb-core's socket: a round trip between two threads per row (waking the asyncio
thread, then waiting for it and for the GIL), which is most of `log`'s time on a small machine
(`benchmarks/backfill.py`'s phase table). Within `batched(run)`, each record that `run.log` builds is kept, in
order, and handed to the asyncio thread a few hundred at a time, without waiting, so that wandb-core reads one
part while the next is built. `run.log` itself still does all of its work (checks, media, steps, summary), so
the records are exactly those it would have sent.

This leans on the client's internals (`Run._interface`, `InterfaceSock._publish` and `_deliver`, its asyncio
manager, the service client's socket writer and framing), so it runs only where `private_api.enabled()` (a
verified wandb version, public path not forced) and the internals are what it expects; elsewhere `batched` does
nothing and every row goes on its own through `run.log` (`tests/test_wandb_writer.py` shows which path each
version takes, and fails if a verified version takes the slow one). Either way, what counts as uploaded is
what the read-back check finds in the `.wandb` file.
"""
from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

from uploader.wandb import private_api

SEND_BYTES = 64 * 1024  # a part of the batch on its way to wandb-core: a few hundred rows

_INTERFACE = ("_assign", "_asyncer", "_client", "_publish", "_deliver")
_CLIENT = ("_writer", "_drain_writer", "_broken_exc")


def supported(handle: Any) -> bool:
    """Whether `handle`'s client is the one this module knows how to batch for (imported only then: another
    wandb may have moved these modules)."""
    if not private_api.enabled():
        return False
    try:
        from wandb.sdk.interface.interface_sock import InterfaceSock
    except ImportError:
        return False
    interface = getattr(handle, "_interface", None)
    return (
        isinstance(interface, InterfaceSock)
        and all(hasattr(interface, name) for name in _INTERFACE)
        and all(hasattr(interface._client, name) for name in _CLIENT)
        and not {"_publish", "_deliver"} & vars(interface).keys()  # already batching
    )


@contextlib.contextmanager
def batched(handle: Any) -> Iterator[None]:
    """Collect what `handle` publishes meanwhile; send it in parts of `SEND_BYTES` without waiting, and the rest
    when the block ends normally, waiting until all of it is written. The order of records is kept: the asyncio
    thread runs its tasks in the order they were handed over, each writes its part before it yields, and a
    request that waits for an answer (none does during `run.log`) first sends what was collected. On an
    exception the rest is not sent: the caller discards the segment."""
    if not supported(handle):
        yield
        return
    from wandb.proto import wandb_server_pb2 as spb
    from wandb.sdk.lib.service.service_client import _HEADER_BYTE_INT_FMT

    interface = handle._interface
    frames: list[bytes] = []
    collected_bytes = 0

    def collect(record: Any, *, nowait: bool = False) -> None:
        """What `InterfaceSock._publish` and `ServiceClient._send_server_request` make of a record: a header
        (`W` and the length) and the serialized request."""
        interface._assign(record)
        request = spb.ServerRequest()
        request.record_publish.CopyFrom(record)
        data = request.SerializeToString()
        frames.extend((struct.pack(_HEADER_BYTE_INT_FMT, ord("W"), len(data)), data))
        nonlocal collected_bytes
        collected_bytes += len(data)
        if collected_bytes >= SEND_BYTES:
            collected_bytes = 0
            send(wait=False)

    def send(*, wait: bool = True) -> None:
        """Hand what was collected to the asyncio thread; `wait`: until it and every part before it is written
        (and raise what broke the socket, which a part sent without waiting only logs)."""
        payload = b"".join(frames)
        frames.clear()
        if wait:
            interface._asyncer.run(lambda: _write(interface._client, payload))
        elif payload:
            interface._asyncer.run_soon(lambda: _write(interface._client, payload))

    deliver = interface._deliver

    def deliver_in_order(record: Any) -> Any:
        send()
        return deliver(record)

    interface._publish, interface._deliver = collect, deliver_in_order
    try:
        yield
        send()
    finally:
        del interface._publish, interface._deliver


async def _write(client: Any, payload: bytes) -> None:
    """`ServiceClient._send_server_request` for many requests at once: one write, then the socket's flow control;
    a broken socket stays broken for the client's later requests, as there."""
    if client._broken_exc is not None:
        raise client._broken_exc
    client._writer.write(payload)
    try:
        await client._drain_writer()
    except Exception as exc:
        client._broken_exc, client._broken_tb = exc, exc.__traceback__
        raise
