"""Errors raised when a checkpoint cannot be read or does not fit the model it is loaded into."""

__all__ = ["CheckpointCorruptError", "CheckpointMismatchError"]


class CheckpointCorruptError(ValueError):
    """A checkpoint file is unreadable or malformed; the message names the file."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a model (or optimizer) of another structure; the message
    names the differing keys with their saved and current shapes/dtypes."""
