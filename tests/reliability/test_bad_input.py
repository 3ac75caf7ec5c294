"""Bad input is one `error:` line and exit 2, refused before anything is built (and nothing
left behind); anything else is one line and exit 1 with the traceback under DVE_DEBUG=1."""

from __future__ import annotations

import pickle

import pytest
from rel_helpers import invoke, one_error_line, tiny_args

from dve_repro import train as train_mod

BAD = {
    "in-features": (["model.in_features=100"], "model.in_features=100 but mnist images have 784"),
    "n-classes": (["model.n_classes=5"], "model.n_classes=5 but mnist has 10 classes"),
    "split-seed": (["data.split_seed=-1"], "data.split_seed must be >= 0"),
    "order-seed": (["train.order_seed=-1"], "train.order_seed must be >= 0"),
    "huge-hidden": (["model.hidden=[2000000000]"], "more than this machine's"),
    "batch-too-big": (["train.batch_size=100000"], "larger than the training set"),
    "bf16-on-cpu": (["train.dtype=bfloat16"], "bfloat16"),
    "warmup-too-long": (
        ["schedule=warmup_cosine", "schedule.warmup_steps=1000"],
        "not shorter than the run",
    ),
    "gpt-on-mnist": (["model=pythia_tiny"], "needs text data"),
    "typo-key": (["optim.lrr=0.1"], "did you mean optim.lr?"),
    "unknown-experiment": (["experiment=nope"], "available: "),
}


def lm_args(tmp_path, *extra: str) -> list[str]:
    return [
        "experiment=pythia_tiny",
        f"runtime.out_root={tmp_path / 'runs'}",
        "runtime.progress=false",
        f"data.cache_dir={tmp_path / 'tok'}",
        *extra,
    ]


@pytest.mark.parametrize(("overrides", "needle"), BAD.values(), ids=BAD.keys())
def test_bad_config_is_one_line_and_leaves_nothing(tmp_path, overrides, needle):
    root = tmp_path / "runs"
    line = one_error_line(invoke("train", *tiny_args(root), *overrides), needle)
    if overrides == ["experiment=nope"]:
        assert "tiny_mlp" in line and "mnist_mlp" in line
    assert not root.exists(), "a refused command left a folder behind"


def test_huge_vocabulary_is_refused_before_allocating(tmp_path):
    one_error_line(
        invoke("train", *lm_args(tmp_path, "model.vocab_size=100000000000")),
        "more than this machine's",
    )


def test_out_root_that_is_a_file_or_unwritable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_error_line(invoke("train", *tiny_args(afile)), "is a file, not a folder")
    one_error_line(invoke("train", *tiny_args("/proc/dve-runs")), "/proc/dve-runs")


def test_text_n_train_beyond_the_source_is_refused_before_tokenizing(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text('{"text": "a short document"}\n' * 20)
    args = lm_args(tmp_path, "data.source=jsonl", f"data.path={shards}", "data.n_train=100000000")
    one_error_line(invoke("train", *args), "data.n_train=100000000", "lower data.n_train")
    assert not (tmp_path / "tok").exists(), "tokenized before refusing"


def test_garbage_jsonl_names_the_bad_line_at_any_fraction(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text("this is not json\n" * 50)
    args = lm_args(
        tmp_path, "data.source=jsonl", f"data.path={shards}", "data.fraction=0.01", "data.n_train=0"
    )
    one_error_line(invoke("train", *args), "a.jsonl:1: not valid JSON")


def test_crafted_cifar_pickle_is_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (folder / name).write_bytes(pickle.dumps(Evil()))
    args = [
        "experiment=cifar10_noise",
        f"data.root={tmp_path / 'cifar'}",
        f"runtime.out_root={tmp_path / 'runs'}",
        "runtime.progress=false",
    ]
    line = one_error_line(
        invoke("train", *args), "not the official CIFAR-10 file", "data.trust_pickle=true"
    )
    assert "pickle" in line and not marker.exists(), "the crafted file ran"


def test_an_internal_error_is_one_line_with_the_debug_hint(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("something dve did not expect\nsecond line")

    monkeypatch.setattr(train_mod, "run_training", broken)
    one_error_line(
        invoke("train", *tiny_args(tmp_path)), "internal error ValueError", "DVE_DEBUG=1", code=1
    )
    monkeypatch.setenv("DVE_DEBUG", "1")
    res = invoke("train", *tiny_args(tmp_path))
    assert res.exit_code == 1 and isinstance(res.exception, ValueError)
