"""When a client calls again after a refusal: shared by Client and AsyncClient."""

from __future__ import annotations

import logging
import random
import time

import grpc

from featurepush.errors import FeaturepushError

_LOGGER = logging.getLogger("featurepush.client")

# What a call that reached no server able to take it ends with: a server starting, stopping or restarting,
# a killed `serve --processes` front or store process. The call may have been carried out all the same, so
# it is sent again only where that is safe: reads, and pushes with a request id (answered once).
RESENDABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0


class Retries:
    """One call's budget: the server's RetryInfo delays within `overload_s`, and where resending is safe,
    UNAVAILABLE and CANCELLED within `unavailable_s`, backing off from 50 ms to a second."""

    def __init__(self, overload_s: float, unavailable_s: float, *, resend: bool) -> None:
        now = time.monotonic()
        self._overload_until = now + overload_s
        self._unavailable_until = now + unavailable_s if resend else now
        self._backoff = _FIRST_BACKOFF_S

    def delay(self, error: FeaturepushError) -> float | None:
        """Seconds to wait before calling again, or None when the error is the call's answer."""
        now = time.monotonic()
        if error.retry_delay_s is not None:
            if now + error.retry_delay_s > self._overload_until:
                return None
            # Jitter spreads the clients an overloaded server refused at the same moment.
            return error.retry_delay_s * random.uniform(1.0, 1.5)
        if error.code not in RESENDABLE or now >= self._unavailable_until:
            return None
        delay = min(self._backoff * random.uniform(0.5, 1.0), self._unavailable_until - now)
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF_S)
        _LOGGER.info("%s; sending the call again in %.2fs", error, delay)
        return delay
