"""What the processes of `serve --processes` know of each other: the runtime folder's files and /proc.

Kept apart from processes.py, which runs as the children's `__main__`: a backfill worker imports this
module before it starts, and would otherwise have imported processes.py before Python ran it as the main
module again (the worker's copy of its front's `__main__`), which Python warns of.
"""

from __future__ import annotations

from pathlib import Path

# The store owner's socket and the catalog's version counter, in the runtime folder.
SOCKET = "store.sock"
CATALOG = "catalog"
# The count of the owner's writes, by which a front knows whether it may answer a read itself.
WRITES = "writes"


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """A process's state letter, parent pid and start time (clock ticks after boot) from /proc, None if gone.

    The start time tells a process from a later one given the same pid.
    """
    try:
        # After the command's closing parenthesis, which the command itself may contain.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
