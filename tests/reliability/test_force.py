"""`--force` builds beside the old folder and swaps it in only when complete; a refused config
or an interrupted rebuild leaves the old result and no half-made folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
from rel_helpers import invoke, ok, one_error_line, snapshot, tiny_args

from dve_repro import embedding


def _grads(work):
    (folder,) = work["root"].glob("tiny_mlp/grads-*")
    return folder


def test_garbage_done_mask_in_a_finished_store_is_recomputed(work, pristine):
    (_grads(work) / "done.npy").write_bytes(b"garbage")
    res = invoke("embed", *tiny_args(work["root"]), "--force")
    assert ok(res) == work["embed"] and "recomputing the gradients" in res.stderr
    pd.testing.assert_frame_equal(
        pd.read_parquet(work["embed"] / "scores.parquet"),
        pd.read_parquet(pristine["embed"] / "scores.parquet"),
    )


def test_garbage_done_mask_with_force_keeps_the_old_embedding(work):
    grads = _grads(work)
    (grads / "DONE").unlink()
    (grads / "done.npy").write_bytes(b"garbage")
    before = snapshot(work["embed"])
    one_error_line(invoke("embed", *tiny_args(work["root"]), "--force"), "done.npy")
    assert snapshot(work["embed"]) == before
    assert not list(work["embed"].parent.glob(".*.new-*"))


def test_interrupted_force_keeps_the_old_result(work, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedding, "algorithm1", interrupted)
    before = snapshot(work["embed"])
    res = invoke("embed", *tiny_args(work["root"]), "--force")
    assert res.exit_code == 130 and "nothing finished was lost" in res.stderr
    assert snapshot(work["embed"]) == before
    assert not list(work["embed"].parent.glob(".*.new-*"))
    assert invoke("verify", work["embed"]).exit_code == 0


def test_force_rebuild_swaps_in_a_verified_folder(work, pristine):
    assert ok(invoke("embed", *tiny_args(work["root"]), "--force")) == work["embed"]
    assert np.array_equal(np.load(work["embed"] / "E.npy"), np.load(pristine["embed"] / "E.npy"))
    assert invoke("verify", work["root"]).exit_code == 0
    assert not [p for p in work["embed"].parent.iterdir() if p.name.startswith(".")]


def test_refused_configs_leave_nothing_behind(work):
    exp = work["root"] / "tiny_mlp"
    before = sorted(p.name for p in exp.iterdir())
    one_error_line(
        invoke("embed", *tiny_args(work["root"]), "projection.k_in=7", "embed.max_matrix_gb=1e-9"),
        "embed.max_matrix_gb",
    )
    one_error_line(
        invoke("compare-tsloo", *tiny_args(work["root"]), "tsloo.n_points=100000"), "tsloo.n_points"
    )
    assert sorted(p.name for p in exp.iterdir()) == before
