"""The TileStore part of a backend that does not hold stream feature views yet.

Such a store holds no views, services or tiles: reads find none, so pushes and source reads work as
usual, and applying a view is refused with one clear FAILED_PRECONDITION naming the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..errors import FailedPrecondition


class NoViews:
    """Mixed into a backend: no views, services or tiles, and a clear refusal to store any."""

    #: What the refusal calls this store, such as "Redis Cluster".
    store_name = "this store"

    def _refuse(self) -> FailedPrecondition:
        return FailedPrecondition(
            "stream feature views are kept by the embedded RocksDB store (with any --processes) and by a "
            f"single Redis node; {self.store_name} does not hold them yet",
            reason="VIEWS_NOT_SUPPORTED",
        )

    def get_view(self, name: str) -> tuple[int, bytes] | None:
        """None: no view is stored here."""
        return None

    def list_views(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """No views."""
        return iter(())

    def put_view(self, name: str, definition: bytes, view_id: int | None = None, *, invalidate: bool) -> int:
        """Refused: views cannot be stored here."""
        raise self._refuse()

    def delete_view(self, name: str, view_id: int) -> int:
        """Refused: there is no view to delete."""
        raise self._refuse()

    def view_generation(self, view_id: int) -> int:
        """-1, as for a deleted view."""
        return -1

    def has_tiles(self, view_id: int) -> bool:
        """False: no tiles."""
        return False

    def get_service(self, name: str) -> bytes | None:
        """None: no service is stored here."""
        return None

    def list_services(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """No services."""
        return iter(())

    def put_service(self, name: str, definition: bytes) -> None:
        """Refused: services cannot be stored here."""
        raise self._refuse()

    def delete_service(self, name: str) -> None:
        """Refused: there is no service to delete."""
        raise self._refuse()

    def tile_key(self, view_id: int, entity: bytes, start_micros: int) -> bytes:
        """Refused: there are no tiles."""
        raise self._refuse()

    def tile_keys(self, view_id: int, entities: Sequence[bytes], starts: np.ndarray) -> list[bytes]:
        """Refused: there are no tiles."""
        raise self._refuse()

    def read_tiles(self, keys: list[bytes]) -> list[bytes | None]:
        """None for every key."""
        return [None] * len(keys)

    def scan_tiles(
        self, view_id: int, entities: Sequence[bytes], first_micros: int, last_micros: int
    ) -> tuple[list[int], np.ndarray, list[bytes]]:
        """No tiles."""
        return [0] * len(entities), np.zeros(0, dtype=np.int64), []

    def view_state(self, view_id: int) -> bytes | None:
        """None: no state."""
        return None

    def update_view_state(self, view_id: int, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Refused: there is no view state to change."""
        raise self._refuse()

    def delete_tiles_before(self, view_id: int, start_micros: int) -> int:
        """Nothing to delete."""
        return 0
