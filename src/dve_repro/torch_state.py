"""Process-wide torch settings, changed only inside a ``with`` block and restored after it.

``torch.set_num_threads`` and ``torch.use_deterministic_algorithms`` are global to the
process: a library call that sets them and returns leaves the caller's notebook or test
running with other settings (and, for the thread count, other last bits: ATen splits
reductions by thread count). Every dve stage that needs them uses these two blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (``None`` or ``<= 0``: leave as is)."""
    if n is None or n <= 0 or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic(flag: bool = True) -> Iterator[None]:
    """Run the block with ``torch.use_deterministic_algorithms(flag)`` (warn-only as before)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)
