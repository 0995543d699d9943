"""How an adapter (mmdet2, mmdet3) tells the worker that a job failed, or that it is no longer the job's owner."""
from __future__ import annotations


class JobError(Exception):
    """A job failure with a message meant for the user; `retryable` when another attempt may pass."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class LeaseLost(Exception):
    """Another worker owns the job now: stop and drop the result."""
