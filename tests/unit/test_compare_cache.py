"""The comparison's method caches are keyed by exactly what each method reads (compare.py,
``method_payload``): an embedding setting recomputes only ``dvemb``, the influence
function's damping only ``influence``, the summary's bootstrap no method; summaries built
from reused caches equal fresh ones; a damaged cache is recomputed and an interrupted
comparison resumes with the methods it had finished.

On the seconds-long ``tiny_mlp`` run (T = 16 steps), 8 TSLOO points, 3 validation queries."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dve_repro import artifacts, baselines, embedding, unroll
from dve_repro.compare import SCORES, run_compare
from dve_repro.config import compose

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ("tsloo.n_points=8", "baselines.val_points=3", "baselines.bootstrap=20", "baselines.curvatures=[hessian,ef]")
CACHED = {"unrolled-hessian", "unrolled-ef", "influence", "tracin", "grad-dot"}
ALL = CACHED | {"dvemb"}


@pytest.fixture
def computed(monkeypatch):
    """Counts of the method computations of each comparison (``dvemb`` = the embedding's Algorithm 1)."""
    calls: Counter = Counter()

    def spy(module, attr, name_of):
        original = getattr(module, attr)

        def wrapper(*args, **kwargs):
            calls[name_of(args)] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    spy(unroll, "unrolled_scores", lambda a: f"unrolled-{a[2]}")
    spy(baselines, "influence_function", lambda a: "influence")
    spy(baselines, "tracin", lambda a: "tracin")
    spy(baselines, "grad_dot", lambda a: "grad-dot")
    spy(embedding, "algorithm1", lambda a: "dvemb")
    return calls


def _compare(tiny, tmp_path, calls: Counter, *extra: str, force: bool = False, results: str = "results") -> set[str]:
    """Run a comparison; return the methods it computed (and reset the counts)."""
    calls.clear()
    out = run_compare(compose(tiny(*BASE, *extra)), tmp_path / results, force=force, figures=False)
    assert out == tmp_path / results
    assert all(n == 1 for n in calls.values()), calls
    done = set(calls)
    calls.clear()
    return done


def _tables(tmp_path, results: str = "results") -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(tmp_path / results / "summary.csv"), pd.read_csv(tmp_path / results / "tidy.csv")


def _method_folder(out_root, method: str):
    (folder,) = (p for p in (Path(out_root) / "tiny_mlp").glob(f"method-{method}-*") if p.is_dir())
    return folder


def test_each_method_is_recomputed_only_when_what_it_reads_changes(tiny, tmp_path, out_root, computed):
    assert _compare(tiny, tmp_path, computed) == ALL
    first = _tables(tmp_path)
    root = Path(out_root) / "tiny_mlp"
    folders = sorted(p for p in root.glob("method-*") if p.is_dir())
    assert [f.name.rsplit("-", 1)[0] for f in folders] == sorted(f"method-{m}" for m in CACHED)
    assert not list(root.glob("compare-*"))
    for folder in folders:
        assert artifacts.verify(folder) == []
    assert (tmp_path / "results" / "influence_cg.json").is_file()

    # the same config again: nothing is recomputed, the tables are the same
    assert _compare(tiny, tmp_path, computed) == set()
    for a, b in zip(_tables(tmp_path), first, strict=True):
        pd.testing.assert_frame_equal(a, b)

    # an embedding setting: only the embedding; the paper's estimator (random Kronecker, EF)
    # now appears beside it as dvemb-paper — the first comparison's embedding, reused
    assert _compare(tiny, tmp_path, computed, "embed.curvature=gn") == {"dvemb"}
    summary, _ = _tables(tmp_path)
    mine = ~summary["method"].isin(["dvemb", "dvemb-paper"])
    pd.testing.assert_frame_equal(summary[mine].reset_index(drop=True),
                                  first[0][first[0]["method"] != "dvemb"].reset_index(drop=True))
    paper = summary[summary["method"] == "dvemb-paper"].assign(method="dvemb").reset_index(drop=True)
    pd.testing.assert_frame_equal(paper, first[0][first[0]["method"] == "dvemb"].reset_index(drop=True))
    assert not np.array_equal(summary[summary["method"] == "dvemb"]["spearman"].to_numpy(), paper["spearman"].to_numpy())
    # ... and not when asked not to
    assert _compare(tiny, tmp_path, computed, "embed.curvature=gn", "baselines.paper_dvemb=false") == set()
    assert "dvemb-paper" not in set(_tables(tmp_path)[0]["method"])

    # the influence function's damping: only influence
    assert _compare(tiny, tmp_path, computed, "baselines.if_damping=0.05") == {"influence"}
    # the query set: every cached method (the embedding holds every validation point already)
    assert _compare(tiny, tmp_path, computed, "baselines.val_points=2") == CACHED
    # the ground truth's points: no method (the scores cover every training point)
    assert _compare(tiny, tmp_path, computed, "tsloo.n_points=6") == set()

    # the summary's bootstrap: no method; its tables equal a fresh computation's (--force
    # recomputes every cached method, not the embedding)
    boot = ("baselines.bootstrap=30", "baselines.bootstrap_seed=1")
    assert _compare(tiny, tmp_path, computed, *boot) == set()
    reused = _tables(tmp_path)
    assert not reused[0]["spearman_lo"].equals(first[0]["spearman_lo"])  # the intervals did change
    assert _compare(tiny, tmp_path, computed, *boot, force=True, results="fresh") == CACHED
    for a, b in zip(reused, _tables(tmp_path, "fresh"), strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder or lock left


def test_damaged_caches_are_recomputed_and_an_interrupted_comparison_resumes(tiny, tmp_path, out_root,
                                                                             computed, monkeypatch, capsys):
    tracin = baselines.tracin

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines, "tracin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compare(tiny, tmp_path, computed)
    monkeypatch.setattr(baselines, "tracin", tracin)
    computed.clear()
    # the methods finished before the interruption are reused
    assert _compare(tiny, tmp_path, computed) == {"tracin", "grad-dot"}
    first = _tables(tmp_path)
    scores = {m: np.load(_method_folder(out_root, m) / SCORES) for m in CACHED}

    # a flipped bit in a cached score file: that method alone is recomputed, with a warning
    path = _method_folder(out_root, "tracin") / SCORES
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert _compare(tiny, tmp_path, computed) == {"tracin"}
    assert "damaged" in capsys.readouterr().err
    # a truncated score file and an unreadable config.json: recomputed as well
    path = _method_folder(out_root, "influence") / SCORES
    path.write_bytes(path.read_bytes()[:100])
    (_method_folder(out_root, "grad-dot") / "config.json").write_text("{not json")
    assert _compare(tiny, tmp_path, computed) == {"influence", "grad-dot"}
    assert "damaged" in capsys.readouterr().err
    for m in CACHED:
        folder = _method_folder(out_root, m)
        assert artifacts.verify(folder) == []
        np.testing.assert_array_equal(np.load(folder / SCORES), scores[m])
    for a, b in zip(_tables(tmp_path), first, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_the_nonlinear_threshold_keys_the_nonlinear_unrolling_alone():
    """``baselines.adamw_nl_threshold`` enters the cache key of ``unrolled-adamw-nl-*`` and no other."""
    from dve_repro.compare import method_payload

    a = compose(["experiment=mnist_mlp_adamw"])
    b = compose(["experiment=mnist_mlp_adamw", "baselines.adamw_nl_threshold=0.1"])
    for method in ("unrolled-adamw-hessian", "influence", "tracin"):
        assert method_payload(a, method, 3) == method_payload(b, method, 3)
    nl_a, nl_b = method_payload(a, "unrolled-adamw-nl-hessian", 3), method_payload(b, "unrolled-adamw-nl-hessian", 3)
    assert nl_a != nl_b and nl_a["curvature"] == "hessian" and nl_b["nonlinear_threshold"] == 0.1


def test_per_point_baselines_by_default_and_on_request():
    """Classifiers run every per-point baseline; a language model leaves out the influence
    function unless asked (`--baselines`); names come back in the table's order, unknown
    ones are refused."""
    from dve_repro.compare import point_methods
    from dve_repro.errors import DveError

    assert point_methods("classify", None) == ("influence", "tracin", "grad-dot")
    assert point_methods("lm", None) == ("tracin", "grad-dot")
    assert point_methods("lm", True) == ("influence", "tracin", "grad-dot")
    assert point_methods("classify", False) == ()
    assert point_methods("lm", ["grad-dot", "tracin"]) == ("tracin", "grad-dot")
    with pytest.raises(DveError, match="unknown per-point"):
        point_methods("lm", ["tracing"])
