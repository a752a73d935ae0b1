"""Redis commands over many fixed-width arguments, encoded for a whole batch at once.

The ``redis`` client encodes each argument of a command in Python (about 2 µs per argument); the
rows of a table have one width, so the wire form (RESP) of ``MGET``/``MSET``/``DEL`` over a batch
is a header followed by fixed-width records, built here with numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resp_command"]

_CRLF = np.frombuffer(b"\r\n", dtype=np.uint8)


def resp_command(name: bytes, *columns: np.ndarray) -> bytes:
    """The RESP array ``name a0 b0 a1 b1 ...`` for ``columns`` ``[N, W_c]`` uint8 (``a`` the rows of
    the first column, ``b`` of the second...), every argument a bulk string."""
    n = columns[0].shape[0]
    parts: list[np.ndarray] = []
    for column in columns:
        if column.shape[0] != n:
            raise ValueError(f"resp_command: columns of {column.shape[0]} and {n} rows")
        length = np.frombuffer(f"${column.shape[1]}\r\n".encode(), dtype=np.uint8)
        parts += [np.broadcast_to(length, (n, length.size)), column, np.broadcast_to(_CRLF, (n, 2))]
    head = f"*{1 + n * len(columns)}\r\n${len(name)}\r\n".encode() + name + b"\r\n"
    return head + np.concatenate(parts, axis=1).tobytes()
