"""The language-model data stage: Pile reader, packing, split, cache, embedded corpus, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from dve_repro import text
from dve_repro.config import TextDataConfig
from dve_repro.errors import DveError


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("DVE_QUIET", "1")


def _docs(start: int, n: int) -> list[str]:
    return [
        f"Document {i} says that {i * 7} apples and {i + 3} pears fell off the tree."
        for i in range(start, start + n)
    ]


def _lines(docs: list[str]) -> bytes:
    return b"".join(
        json.dumps({"text": d, "meta": {"pile_set_name": "test"}}).encode() + b"\n" for d in docs
    )


@pytest.fixture
def pile(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder with one plain and one zstd (two-frame) shard, 60 documents in all."""
    folder = tmp_path / "pile"
    folder.mkdir()
    a, b = _docs(0, 30), _docs(30, 30)
    (folder / "00.jsonl").write_bytes(_lines(a[:10]) + b"\n" + _lines(a[10:]))  # a blank line
    cctx = zstandard.ZstdCompressor()
    (folder / "01.jsonl.zst").write_bytes(
        cctx.compress(_lines(b[:12])) + cctx.compress(_lines(b[12:]))
    )
    (folder / "notes.txt").write_text("not a shard")
    return folder, a + b


def _cfg(folder: Path, tmp_path: Path, **kw) -> TextDataConfig:
    base = dict(
        source="jsonl",
        path=str(folder),
        seq_len=16,
        n_val=2,
        val_docs_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return TextDataConfig(**base)


def _encode(docs: list[str]) -> list[list[int]]:
    tok, _ = text.load_tokenizer("gpt-neox-20b")
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def test_pile_reader_reads_plain_and_zstd_shards_in_order(pile):
    folder, docs = pile
    shards = text.jsonl_shards(str(folder))
    assert [p.name for p in shards] == ["00.jsonl", "01.jsonl.zst"]
    got = [t for _, t in text._jsonl_documents(shards, 1.0, 0)]
    assert got == docs


def test_packing_split_and_eot(pile, tmp_path):
    folder, docs = pile
    data = text.load_text(_cfg(folder, tmp_path), vocab_size=50304)
    assert data.eot_id == 0  # GPT-NeoX-20B's <|endoftext|>
    assert data.train.dtype == torch.int64 and data.train.shape[1] == 16
    assert data.val.shape == (2, 16)

    train_ids = np.load(data.cache_path / "train_docs.npy")
    val_ids = np.load(data.cache_path / "val_docs.npy")
    assert set(train_ids.tolist()).isdisjoint(val_ids.tolist())
    assert sorted([*train_ids.tolist(), *val_ids.tolist()]) == list(range(len(docs)))
    assert len(val_ids) == round(0.2 * len(docs)) == data.n_docs_val
    assert data.n_docs_train == len(docs) - len(val_ids)

    ids = _encode(docs)
    for split, order, rows in (("train", train_ids, data.train), ("val", val_ids, data.val)):
        stream = [t for i in order for t in [*ids[i], data.eot_id]]
        assert len(np.load(data.cache_path / f"{split}.npy")) == len(stream)
        assert rows.flatten().tolist() == stream[: rows.numel()], split
    assert data.n_tokens_train == sum(len(ids[i]) + 1 for i in train_ids)
    assert data.train.shape[0] == data.n_tokens_train // 16
    assert np.load(data.cache_path / "doc_lengths.npy").tolist() == [len(x) for x in ids]


def test_n_train_caps_and_too_many_sequences_is_an_error(pile, tmp_path):
    folder, _ = pile
    data = text.load_text(_cfg(folder, tmp_path, n_train=5))
    full = text.load_text(_cfg(folder, tmp_path))
    assert data.train.shape == (5, 16) and torch.equal(data.train, full.train[:5])
    assert data.fingerprint != full.fingerprint and data.cache_path == full.cache_path
    with pytest.raises(DveError, match=r"data.n_val=1000 .* lower data.n_val") as exc:
        text.load_text(_cfg(folder, tmp_path, n_val=1000))
    assert "\n" not in str(exc.value)


def test_cache_reuse_and_invalidation(pile, tmp_path, monkeypatch):
    folder, _ = pile
    calls = []
    first = text.load_text(_cfg(folder, tmp_path), progress=lambda *a: calls.append(a))
    assert not first.from_cache and calls and calls[-1][:2] == (2, 2)

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(text, "_tokenize", boom)
    again = text.load_text(_cfg(folder, tmp_path))
    assert again.from_cache and again.fingerprint == first.fingerprint
    assert torch.equal(again.train, first.train) and torch.equal(again.val, first.val)
    monkeypatch.undo()

    shard = folder / "00.jsonl"
    shard.write_bytes(shard.read_bytes() + _lines(["A brand new document about the sea."]))
    changed = text.load_text(_cfg(folder, tmp_path))
    assert not changed.from_cache
    assert changed.cache_path != first.cache_path and changed.fingerprint != first.fingerprint
    assert changed.n_docs_train + changed.n_docs_val == 61


def test_other_split_seed_gives_another_split(pile, tmp_path):
    folder, _ = pile
    a = text.load_text(_cfg(folder, tmp_path, split_seed=0))
    b = text.load_text(_cfg(folder, tmp_path, split_seed=1))
    assert a.cache_path != b.cache_path
    assert (
        np.load(a.cache_path / "val_docs.npy").tolist()
        != np.load(b.cache_path / "val_docs.npy").tolist()
    )


def test_fraction_keeps_a_deterministic_hashed_subset(pile, tmp_path):
    folder, docs = pile
    shards = text.jsonl_shards(str(folder))
    half = [t for _, t in text._jsonl_documents(shards, 0.5, 3)]
    assert half == [t for _, t in text._jsonl_documents(shards, 0.5, 3)]
    assert 15 <= len(half) <= 45 and set(half) < set(docs)
    assert half == [d for i, d in enumerate(docs) if text._keep(i, 3, 0.5)]
    assert half != [t for _, t in text._jsonl_documents(shards, 0.5, 4)]
    data = text.load_text(_cfg(folder, tmp_path, fraction=0.5, split_seed=3))
    assert data.n_docs_train + data.n_docs_val == len(half)


def test_vocab_size_check(pile, tmp_path):
    folder, _ = pile
    with pytest.raises(DveError, match=r"^tokenizer has 50280 ids but model.vocab_size=1000"):
        text.load_text(_cfg(folder, tmp_path), vocab_size=1000)


def _error(cfg: TextDataConfig) -> str:
    with pytest.raises(DveError) as exc:
        text.load_text(cfg)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line_errors_naming_file_and_line(pile, tmp_path):
    folder, _ = pile
    shard = folder / "00.jsonl"
    good = shard.read_bytes()

    shard.write_bytes(_lines(["one", "two"]) + b'{"text": "three"\n')
    assert f"{shard}:3: not valid JSON" in _error(_cfg(folder, tmp_path))

    shard.write_bytes(_lines(["one"]) + b'{"content": "no text here"}\n')
    assert f'{shard}:2: JSON object without a "text" field' in _error(_cfg(folder, tmp_path))

    shard.write_bytes(_lines(["one"]) + b'{"text": 42}\n')
    assert f"{shard}:2:" in _error(_cfg(folder, tmp_path))

    shard.write_bytes(good)
    zst = folder / "01.jsonl.zst"
    zst.write_bytes(b"this is not zstd data at all" * 4)
    assert f"{zst}:1: not a valid zstd file" in _error(_cfg(folder, tmp_path))

    zst.write_bytes(zstandard.ZstdCompressor().compress(_lines(_docs(0, 40)))[:-20])
    assert f"{zst}:" in _error(_cfg(folder, tmp_path)) and "truncated" in _error(
        _cfg(folder, tmp_path)
    )
    # a whole first frame, then a cut-off second one (what a stream reader would let through)
    cctx = zstandard.ZstdCompressor()
    zst.write_bytes(cctx.compress(_lines(_docs(0, 20))) + cctx.compress(_lines(_docs(20, 20)))[:-20])
    assert "truncated" in _error(_cfg(folder, tmp_path))
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "cache").iterdir())


def test_missing_empty_and_documentless_folders(tmp_path):
    assert "data folder not found" in _error(_cfg(tmp_path / "nope", tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no *.jsonl or *.jsonl.zst shards in {empty}" in _error(_cfg(empty, tmp_path))
    (empty / "00.jsonl").write_text("\n  \n")
    assert "no documents in jsonl shards" in _error(_cfg(empty, tmp_path))
    assert "data.path is empty" in _error(
        TextDataConfig(source="jsonl", path="", cache_dir=str(tmp_path))
    )


def test_split_documents_is_seeded_and_disjoint():
    tr, va = text.split_documents(100, 0.05, 7)
    tr2, va2 = text.split_documents(100, 0.05, 7)
    assert tr.tolist() == tr2.tolist() and va.tolist() == va2.tolist()
    assert len(va) == 5 and set(tr.tolist()).isdisjoint(va.tolist())
    with pytest.raises(DveError):
        text.split_documents(1, 0.5, 0)


def test_embedded_corpus_loads_a_limited_number_of_documents(tmp_path):
    cfg = TextDataConfig(seq_len=32, n_val=2, cache_dir=str(tmp_path / "cache"))
    data = text.load_text(cfg, vocab_size=50304, max_docs=300)
    assert data.n_docs_train + data.n_docs_val == 300
    assert data.train.shape[1] == 32 and data.val.shape == (2, 32)
    assert int(data.train.max()) < 50280 and (data.train == data.eot_id).any()
    assert "embedded" in data.source_desc and "300 documents" in data.source_desc
    tok, _ = text.load_tokenizer(cfg.tokenizer)
    words = tok.decode(data.train[:4].flatten().tolist()).split()
    assert sum(w.isalpha() for w in words) > len(words) / 2  # real English, not noise
    again = text.load_text(cfg, vocab_size=50304, max_docs=300)
    assert again.from_cache and torch.equal(again.train, data.train)
    assert os.path.samefile(again.cache_path, data.cache_path)
