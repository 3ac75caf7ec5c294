"""Verified artifacts: every finished folder lists its files with size and BLAKE2b; reuse checks
the list (and that the folder's name is its config's fingerprint); `dve verify` checks a tree.
Truncated files, flipped bits, edited configs and deleted outputs are refused or rebuilt."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from rel_helpers import invoke, ok, one_error_line, tiny_args

from dve_repro import artifacts
from dve_repro.config import compose
from dve_repro.errors import ArtifactError
from dve_repro.replay import TrainedRun
from dve_repro.trajectory import ckpt_path
from dve_repro.tsloo import run_tsloo

T = 16  # tiny_mlp: 256 points, batch 32, 2 epochs


def flip_bit(path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def test_finished_folders_carry_a_manifest_and_verify(pristine):
    train = pristine["train"]
    manifest = json.loads((train / artifacts.MANIFEST).read_text())
    listed = set(manifest["files"])
    on_disk = {str(p.relative_to(train)) for p in train.rglob("*") if p.is_file()} - {
        "DONE",
        "MANIFEST.json",
    }
    assert listed == on_disk and f"checkpoints/step_{T:07d}.safetensors" in listed
    done = json.loads((train / "DONE").read_text())
    assert done["manifest_blake2b"] == artifacts.hash_file(train / artifacts.MANIFEST)
    res = invoke("verify", pristine["root"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all(
        line.startswith("ok") for line in lines
    )  # train, capture, embed, grads


@pytest.mark.parametrize("step", [0, T], ids=["theta0", "thetaT"])
def test_flipped_bit_in_a_checkpoint_is_refused_then_rebuilt(work, pristine, step):
    train = work["train"]
    flip_bit(ckpt_path(train, step))
    one_error_line(
        invoke("embed", train, "runtime.progress=false", "--force"),
        "is damaged",
        f"step_{step:07d}.safetensors changed after the run finished",
    )
    res = invoke("verify", train)
    assert res.exit_code == 1 and res.stdout.startswith("DAMAGED"), res.output
    res = invoke("train", *tiny_args(work["root"]))
    assert ok(res) == train and "damaged" in res.stderr and "rebuilding" in res.stderr
    assert ckpt_path(train, step).read_bytes() == ckpt_path(pristine["train"], step).read_bytes()
    assert invoke("verify", train).exit_code == 0


def test_flipped_bit_and_truncation_in_gradients_are_refused(work):
    cap = work["capture"]
    flip_bit(cap / "grads" / "G.npy", offset=-100)
    one_error_line(invoke("embed", cap, "runtime.progress=false", "--force"), "grads/G.npy changed")
    truncate(cap / "grads" / "G.npy")
    line = one_error_line(
        invoke("embed", cap, "runtime.progress=false", "--force"), "grads/G.npy has"
    )
    assert "the manifest says" in line


def test_truncated_or_flipped_embedding_is_refused_by_score_and_rebuilt_by_embed(work, pristine):
    emb = work["embed"]
    truncate(emb / "E.npy")
    one_error_line(invoke("score", emb), "E.npy has")
    flip_bit(emb / "scores.parquet", offset=40)
    res = invoke("embed", *tiny_args(work["root"]))
    assert ok(res) == emb and "damaged" in res.stderr and "rebuilding" in res.stderr
    for name in ("E.npy", "scores.parquet"):
        assert (emb / name).read_bytes() == (pristine["embed"] / name).read_bytes(), name


def test_deleted_scores_are_restored(work, pristine):
    emb = work["embed"]
    (emb / "scores.parquet").unlink()
    ok(invoke("embed", *tiny_args(work["root"])))
    pd.testing.assert_frame_equal(
        pd.read_parquet(emb / "scores.parquet"),
        pd.read_parquet(pristine["embed"] / "scores.parquet"),
    )


def test_edited_config_is_refused(work):
    train = work["train"]
    saved = json.loads((train / "config.json").read_text())
    saved["config"]["data"]["split_seed"] = 7  # the payload left as it was
    (train / "config.json").write_text(json.dumps(saved))
    one_error_line(invoke("embed", train, "runtime.progress=false"), "is damaged: config.json")


def test_a_consistently_forged_folder_fails_the_fingerprint(work):
    """Edited payload and config, manifest and DONE rewritten to match: the name still gives it away."""
    train = work["train"]
    saved = json.loads((train / "config.json").read_text())
    saved["config"]["data"]["split_seed"] = 7
    saved["payload"]["data"]["split_seed"] = 7
    (train / "config.json").write_text(json.dumps(saved))
    artifacts.write_json(train / artifacts.MANIFEST, artifacts.build_manifest(train))
    artifacts.write_json(
        train / "DONE", {"manifest_blake2b": artifacts.hash_file(train / artifacts.MANIFEST)}
    )
    assert any("fingerprint" in p for p in artifacts.verify(train))
    one_error_line(invoke("embed", train, "runtime.progress=false"), "fingerprint")


def test_open_npy_refuses_a_short_file_and_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1000, dtype=np.float64))
    truncate(path)
    size = path.stat().st_size
    with pytest.raises(ArtifactError, match="truncated") as exc:
        artifacts.open_npy(path, "r+")
    assert (
        "\n" not in str(exc.value) and path.stat().st_size == size
    )  # numpy's r+ would zero-pad it
    path.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        artifacts.load_npy(path)


def test_truncated_ground_truth_part_is_refused_not_zero_filled(pristine, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(pristine["root"], root)
    cfg = compose(
        tiny_args(root, "tsloo.n_points=8", "tsloo.settings=[single]", "tsloo.conventions=[keep]")
    )
    run = TrainedRun.load(root / pristine["train"].relative_to(pristine["root"]))
    gt = run_tsloo(cfg, run)
    (gt / "DONE").unlink()
    delta = gt / "part-0-of-1" / "delta.npy"
    truncate(delta)
    size = delta.stat().st_size
    with pytest.raises(ArtifactError, match="truncated"):
        run_tsloo(cfg, run)
    assert delta.stat().st_size == size and not (gt / "DONE").exists()


def test_damaged_ground_truth_is_rebuilt_and_swapped_in(pristine, tmp_path):
    """A finished ground-truth folder without its manifest (an older dve, or a deleted file)
    is recomputed beside it and swapped in: the next stage reads a verified folder with the
    same deltas (the rebuild once ran but never replaced the old folder)."""
    from dve_repro.tsloo import load_ground_truth

    root = tmp_path / "runs"
    shutil.copytree(pristine["root"], root)
    cfg = compose(
        tiny_args(root, "tsloo.n_points=4", "tsloo.settings=[single]", "tsloo.conventions=[keep]")
    )
    run = TrainedRun.load(root / pristine["train"].relative_to(pristine["root"]))
    gt = run_tsloo(cfg, run)
    _, before = load_ground_truth(gt)
    (gt / artifacts.MANIFEST).unlink()
    assert run_tsloo(cfg, run) == gt
    assert not artifacts.verify(gt)
    _, after = load_ground_truth(gt)
    np.testing.assert_array_equal(after, before)
