"""The sole-gradient-source split of scripts/adamw_sole_sources.py (issue 11's diagnosis)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "adamw_sole_sources", Path(__file__).parents[2] / "scripts" / "adamw_sole_sources.py")
mod = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mod)


def test_a_token_counts_only_when_no_other_sequence_fed_its_row_before_or_beside():
    tokens = np.array([[1, 2, 3], [3, 4, 5], [5, 6, 7], [2, 8, 9]])
    batches = [np.array([0, 1]), np.array([2, 3])]
    wanted = {1, 2, 3, 4, 6, 7, 8}
    assert mod.sole_sources(tokens, batches, 0, 0, wanted) == [1, 2]  # 3 also in sequence 1
    assert mod.sole_sources(tokens, batches, 1, 0, wanted) == [4]  # 5 is not a validation token
    assert mod.sole_sources(tokens, batches, 2, 1, wanted) == [6, 7]  # 5 was fed at step 0
    assert mod.sole_sources(tokens, batches, 3, 1, wanted) == [8]  # 2 was fed at step 0 by sequence 0
