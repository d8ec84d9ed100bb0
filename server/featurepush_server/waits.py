"""Bounds on the handler threads that wait for a caller's request messages, in number and in time.

grpcio's synchronous server gives a call a thread of its pool before the request message has arrived, and
that thread then waits for the message for as long as the caller takes: a caller that opens calls and never
finishes sending them would hold every thread (and the part of each message sent so far) until the server
answers nothing. Here every such wait is registered. A wait that has lasted `slow_s` counts as slow; a
caller address with `per_peer` slow waits has its further calls refused at once (RESOURCE_EXHAUSTED, before
they wait) and its excess slow waits cancelled, as is every wait once `limit` waits are slow in all; any
wait longer than `timeout_s` is cancelled. A cancelled call ends CANCELLED and frees its thread.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from .admission import Overloaded
from .core.line_budget import LineBudget

_LOGGER = logging.getLogger(__name__)

# How often the watch looks for waits to cancel, at most; a wait ends this much past its bound at worst.
_TICK_S = 0.25


def peer_address(peer: str) -> str:
    """The address a call came from, without its port: "ipv4:10.0.0.7:5143" is "10.0.0.7".

    IPv6 addresses count by their /64 network, which one host commonly holds whole.
    """
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    # grpcio writes the brackets of an IPv6 address percent-encoded: "ipv6:%5B::1%5D:5143".
    rest = rest.replace("%5B", "[").replace("%5D", "]")
    if kind == "ipv6" and rest.startswith("["):
        host = rest[1 : rest.find("]")].split("%", 1)[0]
        try:
            return str(ipaddress.IPv6Network((host, 64), strict=False))
        except ValueError:
            return host
    return kind


class SlowRequests(Overloaded):
    """A call refused because too many calls are slow to send their request messages."""

    def __init__(self, why: str):
        super().__init__("any", why, 1.0)
        self.args = (f"featurepush is at its limit of {why}; retry after {self.retry_after_s:.2f}s",)


@dataclass(slots=True)
class _Wait:
    context: grpc.ServicerContext
    since: float
    # Found from the context's peer only once the wait turns slow: nearly every request is there at once.
    address: str | None = None
    cancelled: bool = False


class RequestWaits:
    """The waits of handler threads for their callers' messages; see the module docstring."""

    def __init__(self, limit: int, per_peer: int, timeout_s: float, slow_s: float = 1.0):
        self.limit = max(limit, 1)
        self.per_peer = max(per_peer, 1)
        self.timeout_s = timeout_s
        self.slow_s = min(slow_s, timeout_s)
        self._lock = threading.Lock()
        self._waits: dict[int, _Wait] = {}
        self._tokens = itertools.count()
        # Slow waits per address and in all, as the watch last counted them.
        self._slow: Counter[str] = Counter()
        self._slow_total = 0
        self._watch: threading.Thread | None = None
        self._closed = threading.Event()
        self._lines = LineBudget()
        self.cancelled = 0

    def close(self) -> None:
        """Stop the watch (the server stopped taking calls); a wait after this is bounded no more."""
        self._closed.set()

    def _enter(self, context: grpc.ServicerContext) -> int:
        # Without the lock: dict insertion and removal are atomic, and the watch works on a copy. Racy reads
        # of the slow counts at most let one call more wait, or refuse one as the count falls.
        if self._slow_total:
            address = peer_address(context.peer())
            if self._slow[address] >= self.per_peer:
                raise SlowRequests(f"{self.per_peer} calls from one address still sending their request")
            if self._slow_total >= self.limit:
                raise SlowRequests(f"{self.limit} calls still sending their request")
        token = next(self._tokens)
        self._waits[token] = _Wait(context, time.monotonic())
        if self._watch is None:
            with self._lock:
                if self._watch is None and not self._closed.is_set():
                    self._watch = threading.Thread(
                        target=self._watching, name="featurepush-request-waits", daemon=True
                    )
                    self._watch.start()
        return token

    def _leave(self, token: int) -> None:
        self._waits.pop(token, None)

    def next_message(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The caller's next message, waited for within the bounds; StopIteration when it sent its last.

        Raises Overloaded (before waiting) where the caller's address or the server is at its bound; a
        cancelled wait raises grpcio's RpcError, which grpcio takes as the end of the call it cancelled.
        """
        token = self._enter(context)
        try:
            return next(requests)
        finally:
            self._leave(token)

    def each(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        refuse: Callable[[grpc.ServicerContext, Overloaded], None],
    ) -> Iterator[Any]:
        """The caller's messages, each waited for within the bounds; `refuse` ends a call turned away."""
        while True:
            try:
                message = self.next_message(requests, context)
            except StopIteration:
                return
            except Overloaded as e:
                # Raised where the servicer reads its requests: the call ends with the refusal's status.
                refuse(context, e)
                raise
            yield message

    def _watching(self) -> None:
        while not self._closed.wait(min(_TICK_S, self.slow_s)):
            try:
                self._sweep()
            except Exception:  # noqa: BLE001 - the watch must outlive any one round
                _LOGGER.exception("watching calls for their requests failed; watching on")

    def _sweep(self) -> None:
        """Count the slow waits and cancel those past a bound: too long, or beyond their address's share."""
        now = time.monotonic()
        doomed: list[_Wait] = []
        while True:
            try:
                # Handler threads add and remove waits without the lock; copying may meet one doing so.
                waits = list(self._waits.values())
                break
            except RuntimeError:
                continue
        with self._lock:
            slow = sorted(
                (w for w in waits if now - w.since >= self.slow_s and not w.cancelled), key=lambda w: w.since
            )
            by_address: Counter[str] = Counter()
            kept = 0
            for wait in slow:
                if wait.address is None:
                    wait.address = peer_address(wait.context.peer())
                address = wait.address
                by_address[address] += 1
                # The oldest waits of an address are kept up to its share; a flood's newer ones go.
                if (
                    now - wait.since >= self.timeout_s
                    or by_address[address] > self.per_peer
                    or kept >= self.limit
                ):
                    wait.cancelled = True
                    doomed.append(wait)
                else:
                    kept += 1
            self._slow = Counter(w.address or "" for w in slow if not w.cancelled)
            self._slow_total = kept
            self.cancelled += len(doomed)
        for wait in doomed:
            held = self._lines.take("cancelled")
            if held is not None:
                _LOGGER.warning(
                    "cancelled a call from %s whose request had not arrived after %.1fs (%d slow to send "
                    "theirs from that address, %d in all; %d such lines held back)",
                    wait.address,
                    now - wait.since,
                    by_address[wait.address or ""],
                    len(slow),
                    held,
                )
            wait.context.cancel()  # type: ignore[no-untyped-call]


def guarded(
    handler: Any,
    waits: RequestWaits,
    refuse: Callable[[grpc.ServicerContext, Overloaded], None],
    wrap_streams: bool,
) -> Any:
    """`handler` reading its request messages through `waits`: a unary request is read as a stream of one.

    `refuse` ends a call that `waits` turns away. Streams of requests are guarded per message where
    `wrap_streams`; a stream whose own code bounds its idle time (PushStream) is left as it is.
    """
    kind = (handler.request_streaming, handler.response_streaming)
    if kind[0] and not wrap_streams:
        return handler
    behavior: Callable[..., Any] = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind]
    streaming = kind[0]

    def handle(requests: Iterator[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
        try:
            if streaming:
                return behavior(waits.each(requests, context, refuse), context, *callback)
            try:
                request = waits.next_message(requests, context)
            except StopIteration:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "the call ended without its request message")
        except Overloaded as e:
            refuse(context, e)
            raise
        return behavior(request, context, *callback)

    # grpcio runs a handler marked non-blocking with a callback for its responses, in its own pool if named.
    for attribute in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, attribute):
            setattr(handle, attribute, getattr(behavior, attribute))
    factory = grpc.stream_stream_rpc_method_handler if kind[1] else grpc.stream_unary_rpc_method_handler
    return factory(
        handle,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
