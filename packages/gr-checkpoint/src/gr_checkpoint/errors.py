"""Errors raised when a checkpoint cannot be read, is unsafe to read, or does not fit its model."""

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "LegacyCheckpointError",
    "UnsafeCheckpointError",
    "UnsafeExtraStateError",
]


class CheckpointCorruptError(ValueError):
    """A checkpoint file is unreadable or malformed; the message names the file."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnsafeCheckpointError(CheckpointCorruptError):
    """A checkpoint file asks for something loading never does: running code (a pickled callable or
    class outside the allowlist) or reading outside the checkpoint folder. Nothing was executed."""


class LegacyCheckpointError(CheckpointCorruptError):
    """A format-1 checkpoint whose extra state is a pickle: refused unless converted by a user who trusts it."""


class UnsafeExtraStateError(TypeError):
    """An ``extra_state`` value that cannot be stored as data; the message names its key and type."""


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a model (or optimizer) of another structure; the message
    names the differing keys with their saved and current shapes/dtypes."""
