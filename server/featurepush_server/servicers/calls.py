"""What servicers hand the core about their call: a stop check that turns true when the call is over."""

from __future__ import annotations

import threading

import grpc

from ..core.locations import StopCheck


def stop_check(context: grpc.ServicerContext) -> StopCheck:
    """True once the call is cancelled, past its deadline or ended (server shutdown included)."""
    ended = threading.Event()
    context.add_callback(ended.set)

    def stop() -> bool:
        if ended.is_set() or not context.is_active():
            return True
        remaining = context.time_remaining()
        return remaining is not None and remaining <= 0

    return stop
