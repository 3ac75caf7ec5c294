"""The mutation gauntlet's catalogue (``scripts/mutants.py``) still matches the source: every
snippet occurs exactly once, so ``make mutants`` plants what it says it plants."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _catalogue():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_snippet_occurs_exactly_once():
    mod = _catalogue()
    assert len(mod.CATALOGUE) >= 30
    problems = mod.check_catalogue(ROOT)
    assert not problems, "the mutant catalogue drifted from the source:\n" + "\n".join(problems)
    for m in mod.CATALOGUE:
        assert m.original != m.replacement and m.what, m.name
