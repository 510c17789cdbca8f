"""Errors raised while finding, loading and decoding data.

Each says what is missing or broken and how to fix it, and derives from the
built-in exception a caller would catch for that kind of failure.
"""

from __future__ import annotations

from ..errors import HubUnavailableError, TimmOODError

__all__ = [
    "CorruptImageError",
    "DataNotFoundError",
    "EmptyDatasetError",
    "HubAuthenticationError",
    "HubUnavailableError",
]


class DataNotFoundError(TimmOODError, FileNotFoundError):
    """The files of an offline source are on none of the paths it searches."""


class HubAuthenticationError(TimmOODError, PermissionError):
    """A hub dataset is gated or private and this machine's login (if any) cannot read it."""


class CorruptImageError(TimmOODError, ValueError):
    """An image of a dataset cannot be decoded; the message names the dataset and index."""

    def __init__(self, dataset: str, index: int, cause: BaseException) -> None:
        super().__init__(
            f"image {index} of dataset {dataset!r} cannot be decoded "
            f"({type(cause).__name__}: {cause}); remove or re-encode that example"
        )
        self.dataset, self.index, self.cause = dataset, index, cause


class EmptyDatasetError(TimmOODError, ValueError):
    """A split or set has no examples: an error rather than a metric computed on nothing."""
