"""`chunks`: a long list of keys, a statement's worth at a time (databases bound the values of one statement)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` in order, `size` at a time (the last chunk may be shorter); nothing for an empty sequence."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
