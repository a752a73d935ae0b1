"""How the multi-process test workers leave once their work is done."""

from __future__ import annotations

import os
import sys


def exit_without_teardown() -> None:
    """Exit 0 now, skipping interpreter teardown. Call it after the rank's work is complete and its process group
    destroyed: teardown aborted once on the 2-core CI machine ("terminate called without an active exception",
    exit -6) after a complete, correct run, inside torch's native teardown rather than in the test code."""
    sys.stdout.flush()
    os._exit(0)
