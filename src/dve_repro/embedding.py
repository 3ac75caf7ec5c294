"""Data value embeddings (DVEmb): the linear algebra of Algorithms 1 and 2 of the paper.

Inputs are already-computed (projected) per-sample gradients of a recorded trajectory
with steps t = 0..T-1:

* ``G`` [N_occ, p]: rows ``offsets[t]:offsets[t+1]`` are g_t(z) at θ_t for z ∈ B_t
  (torch tensor or numpy array / memmap; read in chunks of steps, from the end).
* ``w`` [T]: per-sample step weight w_t = η_t/|B_t| (mean loss).
* ``F`` [N_f, p] with ``f_offsets`` [T+1] (optional): curvature factors, H_t ≈ Σ_{r∈F_t} f_r f_rᵀ
  with the weight w_t in front (empirical Fisher F = G when None; Gauss-Newton has C rows
  per point).
* ``blocks``: None (one M over all p coordinates) or slices partitioning [0, p)
  (one M per layer: block-diagonal curvature, each block follows the recursion alone).

Derivation (paper Eq. 1 and Theorem 2). First-order unrolling gives
``DVEmb^{(t)}(z) = w_t P_t g_t(z)`` with ``P_t = Π_{k>t} (I − w_k H_k)`` (latest on the left)
and P_{T−1} = I. Write P_t = I − M_t. Adding the earliest factor on the right,
``P_{t−1} = P_t (I − w_t F_tᵀF_t) = I − M_t − w_t (I − M_t) F_tᵀ F_t``, so
``M_{t−1} = M_t + Ef_tᵀ F_t`` with ``Ef_t = w_t (F_t − F_t M_tᵀ)``: the "embeddings" of the
factor rows. With F = G these are exactly the embeddings E_t = w_t (G_t − G_t M_tᵀ), hence
Algorithm 1: M ← 0; for t = T−1..0: E_t = w_t (G_t − G_t Mᵀ); M ← M + E_tᵀ G_t. M is not
symmetric in general. Transposing, a query u propagates as v ← (I − w_t F_tᵀF_t) v (H is
symmetric), scoring step t's rows by w_t G_t v first: the matrix-free form.

Algorithm 2 cuts [0, T) at boundaries b_0 = 0 < … < b_K = T. Algorithm 1 inside segment k
gives local embeddings (influence on θ at b_{k+1}) and the propagator Q_k = I − M_k. Since
P_t = Q_{K−1} ⋯ Q_{k+1} P_t^{local}, the final embedding is S_k e_local with the suffix product
S_k = Q_{K−1} ⋯ Q_{k+1}, and the influence on checkpoint b_j (j > k) is u_jᵀ Q_{j−1} ⋯ Q_{k+1} e_local.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dve_repro import torch_state
from dve_repro.errors import DveError

Array = Any  # torch.Tensor | np.ndarray | np.memmap
Blocks = Sequence[slice] | None
Device = str | torch.device  # where the recursion's matrices live (the run's device)
_ROW_CHUNK = 16384


# ----------------------------------------------------------------------------- helpers
def _rows(X: Array, a: int, b: int, dtype: torch.dtype, device: Device = "cpu") -> torch.Tensor:
    """Rows a:b of X as a (fresh, when X is numpy) torch tensor of ``dtype`` on ``device``."""
    chunk = X[a:b]
    if isinstance(chunk, np.ndarray):
        chunk = np.array(chunk)  # copy out of a (possibly read-only) memmap
    return torch.as_tensor(chunk).to(device=device, dtype=dtype)


def _write(out: Array, a: int, b: int, value: torch.Tensor) -> None:
    if isinstance(out, torch.Tensor):
        out[a:b] = value.to(out.device, out.dtype)
    else:
        out[a:b] = value.cpu().numpy().astype(out.dtype, copy=False)


def _spans(blocks: Blocks, p: int) -> list[slice]:
    if blocks is None:
        return [slice(0, p)]
    spans = sorted((slice(*s.indices(p)) for s in blocks), key=lambda s: s.start)
    pos = 0
    for s in spans:
        if s.step != 1 or s.start != pos or s.stop <= s.start:
            raise ValueError(f"blocks must be contiguous slices partitioning [0, {p}): {blocks}")
        pos = s.stop
    if pos != p:
        raise ValueError(f"blocks must be contiguous slices partitioning [0, {p}): {blocks}")
    return spans


def _prepare(G: Array, offsets, w, F: Array | None, f_offsets) -> tuple[list, list, list]:
    offs = [int(x) for x in np.asarray(offsets).tolist()]
    w = w.detach().cpu().double().numpy() if isinstance(w, torch.Tensor) else w
    ws = [float(x) for x in np.asarray(w, dtype=np.float64).reshape(-1).tolist()]
    if len(offs) != len(ws) + 1 or offs[0] != 0 or offs[-1] != G.shape[0]:
        raise ValueError(f"offsets (len {len(offs)}) must go 0..N_occ={G.shape[0]} over T={len(ws)} steps")
    if any(b < a for a, b in itertools.pairwise(offs)):
        raise ValueError("offsets must be non-decreasing")
    if F is None:
        return offs, ws, offs
    foffs = offs if f_offsets is None else [int(x) for x in np.asarray(f_offsets).tolist()]
    if len(foffs) != len(offs) or foffs[0] != 0 or foffs[-1] != F.shape[0] or F.shape[1] != G.shape[1]:
        raise ValueError("F / f_offsets do not match G / offsets")
    return offs, ws, foffs


def _as_output(Ms: list[torch.Tensor], blocks: Blocks):
    return Ms[0] if blocks is None else Ms


def _as_list(M) -> list[torch.Tensor]:
    return [M] if isinstance(M, torch.Tensor) else list(M)


# ----------------------------------------------------------------------------- memory check
def estimate_matrix_bytes(p: int, blocks: Blocks, dtype: torch.dtype = torch.float64) -> int:
    """Bytes of one M: p² (full) or Σ_b p_b² (block-diagonal) elements of ``dtype``."""
    return sum((s.stop - s.start) ** 2 for s in _spans(blocks, p)) * dtype.itemsize


def check_matrix_fits(
    p: int, blocks: Blocks, dtype: torch.dtype, max_gb: float, *, copies: int = 1
) -> None:
    """Raise :class:`DveError` (one line) before allocating ``copies`` M matrices over ``max_gb``."""
    gb = copies * estimate_matrix_bytes(p, blocks, dtype) / 1e9
    if gb > max_gb:
        kind = "full" if blocks is None else f"{len(blocks)} blocks"
        if copies > 1:
            kind += f", {copies} copies"
        raise DveError(
            f"M would be {gb:.1f} GB (p̃={p}, {kind}); use embed.blocks=layer, a smaller projection "
            f"(projection.kind=kronecker/dense), or the matrix-free scorer "
            f"(limit embed.max_matrix_gb={max_gb:g})"
        )


# ----------------------------------------------------------------------------- Algorithm 1
def algorithm1(
    G: Array,
    offsets,
    w,
    *,
    F: Array | None = None,
    f_offsets=None,
    blocks: Blocks = None,
    out: Array | None = None,
    dtype: torch.dtype = torch.float64,
    chunk_steps: int = 64,
    progress: Callable[[int], Any] | None = None,
    max_matrix_gb: float = 8.0,
    device: Device = "cpu",
):
    """Paper Algorithm 1: all embeddings E [N_occ, p] with one backward pass over the steps.

    For t = T−1..0: E_t = w_t (G_t − G_t Mᵀ), then M ← M + Ef_tᵀ F_t (Ef_t = E_t when F is G).
    Writes E into ``out`` (allocated as a [N_occ, p] tensor when None; a numpy memmap is
    written chunk by chunk) and returns ``(out, M_final)``: M after step 0, i.e.
    I − M_final = Π_{t} (I − w_t H_t) (the segment propagator of Algorithm 2); a [p, p]
    tensor, or a list of per-block tensors when ``blocks`` is given. ``progress(n)`` is
    called with the number of steps just finished (an increment). M, the chunks of G / F and
    the arithmetic live on ``device`` in ``dtype``; ``out`` (a CPU memmap or a tensor
    anywhere) receives each finished chunk. M is returned on ``device``.
    """
    offs, ws, foffs = _prepare(G, offsets, w, F, f_offsets)
    n, p = G.shape
    spans = _spans(blocks, p)
    check_matrix_fits(p, blocks, dtype, max_matrix_gb)
    if out is None:
        out = torch.empty(n, p, dtype=dtype, device=device)
    elif tuple(out.shape) != (n, p):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, p)}")
    Ms = [torch.zeros(s.stop - s.start, s.stop - s.start, dtype=dtype, device=device) for s in spans]
    T = len(ws)
    for s1 in range(T, 0, -chunk_steps):
        s0 = max(0, s1 - chunk_steps)
        a = offs[s0]
        Gc = _rows(G, a, offs[s1], dtype, device)
        Fc = None if F is None else _rows(F, foffs[s0], foffs[s1], dtype, device)
        Ec = torch.empty_like(Gc)
        for t in range(s1 - 1, s0 - 1, -1):
            r0, r1 = offs[t] - a, offs[t + 1] - a
            if F is not None:
                f0, f1 = foffs[t] - foffs[s0], foffs[t + 1] - foffs[s0]
            for s, M in zip(spans, Ms, strict=True):
                g = Gc[r0:r1, s]
                e = torch.addmm(g, g, M.T, alpha=-1.0).mul_(ws[t])
                Ec[r0:r1, s] = e
                if F is None:
                    M.addmm_(e.T, g)
                else:
                    f = Fc[f0:f1, s]
                    ef = torch.addmm(f, f, M.T, alpha=-1.0).mul_(ws[t])
                    M.addmm_(ef.T, f)
        _write(out, a, offs[s1], Ec)
        if progress is not None:
            progress(s1 - s0)
    return out, _as_output(Ms, blocks)


def explicit_embeddings(
    G: Array, offsets, w, *, F: Array | None = None, f_offsets=None, blocks: Blocks = None
) -> torch.Tensor:
    """Slow oracle: E_t = w_t G_t Pᵀ with P = Π_{k>t} (I − w_k H_k) built as explicit p×p
    matrices (H_k = F_kᵀF_k, off-block entries zeroed when ``blocks`` is given). Small p only."""
    offs, ws, foffs = _prepare(G, offsets, w, F, f_offsets)
    n, p = G.shape
    Gt = _rows(G, 0, n, torch.float64)
    Ft = Gt if F is None else _rows(F, 0, F.shape[0], torch.float64)
    mask = torch.zeros(p, p, dtype=torch.float64)
    for s in _spans(blocks, p):
        mask[s, s] = 1.0
    E = torch.empty_like(Gt)
    P = torch.eye(p, dtype=torch.float64)
    for t in range(len(ws) - 1, -1, -1):
        E[offs[t] : offs[t + 1]] = ws[t] * Gt[offs[t] : offs[t + 1]] @ P.T
        f = Ft[foffs[t] : foffs[t + 1]]
        P = P @ (torch.eye(p, dtype=torch.float64) - ws[t] * (f.T @ f) * mask)
    return E


def matrix_free_scores(
    G: Array,
    offsets,
    w,
    V,
    *,
    F: Array | None = None,
    f_offsets=None,
    blocks: Blocks = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Scores S = E V without any p×p matrix. V: [p, Q] (or [p]) query gradients at θ_T.

    Backward: S[rows of t] = w_t G_t V, then V ← V − w_t F_tᵀ (F_t V) (per block).
    Returns S [N_occ, Q] (or [N_occ] for a 1-D V).
    """
    offs, ws, foffs = _prepare(G, offsets, w, F, f_offsets)
    V = torch.as_tensor(V, dtype=dtype).clone()
    squeeze = V.dim() == 1
    V = V.reshape(V.shape[0], -1)
    spans = _spans(blocks, G.shape[1])
    S = torch.empty(G.shape[0], V.shape[1], dtype=dtype)
    for t in range(len(ws) - 1, -1, -1):
        g = _rows(G, offs[t], offs[t + 1], dtype)
        S[offs[t] : offs[t + 1]] = ws[t] * (g @ V)
        f = g if F is None else _rows(F, foffs[t], foffs[t + 1], dtype)
        for s in spans:
            V[s] -= ws[t] * (f[:, s].T @ (f[:, s] @ V[s]))
    return S[:, 0] if squeeze else S


# ----------------------------------------------------------------------------- Algorithm 2
@dataclass
class Algorithm2Result:
    """embeddings [N_occ, p] (final model); propagators: Q_k = I − M_k per segment ([p, p] or
    per-block list); dynamics [N_occ, K] (or [N_occ, K, Q]) or None without queries."""

    embeddings: Array
    propagators: list
    dynamics: torch.Tensor | None = None


def _ref(X: Array | None, a: int, b: int):
    """What a worker needs to see rows a:b of X: a file reference for a whole-file memmap,
    else the rows themselves (a copy, pickled)."""
    if X is None:
        return None
    if isinstance(X, np.memmap) and isinstance(X.base, mmap.mmap) and X.flags.c_contiguous:
        return ("memmap", X.filename, X.offset, X.dtype.str, tuple(X.shape), a, b)
    return X[a:b].clone() if isinstance(X, torch.Tensor) else np.array(X[a:b])


def _deref(ref, mode: str = "r"):
    if isinstance(ref, tuple) and ref and ref[0] == "memmap":
        _, path, offset, dt, shape, a, b = ref
        return np.memmap(path, dtype=np.dtype(dt), mode=mode, offset=offset, shape=shape)[a:b]
    return ref


def _segment_job(g_ref, f_ref, out_ref, offs, ws, foffs, blocks, dtype, max_gb, threads):
    out = None if out_ref is None else _deref(out_ref, "r+")
    with torch_state.threads(threads):
        E, M = algorithm1(
            _deref(g_ref), offs, ws, F=_deref(f_ref), f_offsets=foffs, blocks=blocks,
            out=out, dtype=dtype, max_matrix_gb=max_gb,
        )
    if isinstance(out, np.memmap):
        out.flush()
        return None, M
    return E, M


def algorithm2(
    G: Array,
    offsets,
    w,
    boundaries: Sequence[int],
    *,
    F: Array | None = None,
    f_offsets=None,
    blocks: Blocks = None,
    workers: int = 0,
    dtype: torch.dtype = torch.float64,
    queries: dict[int, Any] | None = None,
    out: Array | None = None,
    max_matrix_gb: float = 8.0,
    device: Device = "cpu",
    local: dict[int, Any] | None = None,
) -> Algorithm2Result:
    """Paper Algorithm 2 (parallel influence checkpointing); equal to :func:`algorithm1`.

    Segment k = steps [b_k, b_{k+1}) runs Algorithm 1 alone (M = 0 at its end), giving local
    embeddings and Q_k = I − M_k; final rows of segment k are E_local S_kᵀ with
    S_k = Q_{K−1} ⋯ Q_{k+1}. ``workers > 0`` runs segments in processes forked from a fresh
    'forkserver' that imported torch once (no fork of a threaded parent; one torch thread
    per worker); whole-file memmaps (G, F, out) travel as file references. ``queries``
    {j: u_j [p] or [p, Q]} (u_j = validation gradient at θ_{b_j}, 1 ≤ j ≤ K) adds
    dynamics[row, j−1] = u_jᵀ Q_{j−1} ⋯ Q_{k+1} e_local for rows of segment k < j, NaN otherwise.
    Propagators, queries and products live on ``device`` (queries are moved there);
    ``dynamics`` is returned on the CPU. Worker processes run on the CPU only.

    ``local`` {k: M_k} for every segment: the first phase was run elsewhere
    (:func:`segment_recursions`, e.g. one rank per segment) and ``out`` already holds the
    local embeddings; only the propagation across segments runs here.
    """
    if workers > 0 and torch.device(device).type != "cpu":
        raise DveError(f"embed.workers={workers} runs segments in CPU processes; on {device} use embed.workers=0 "
                       "(the device runs each segment's matrix products in parallel already)")
    offs, ws, foffs = _prepare(G, offsets, w, F, f_offsets)
    n, p = G.shape
    b = [int(x) for x in boundaries]
    K = len(b) - 1
    if K < 1 or b[0] != 0 or b[-1] != len(ws) or any(y <= x for x, y in itertools.pairwise(b)):
        raise ValueError(f"boundaries must be strictly increasing from 0 to T={len(ws)}: {b}")
    spans = _spans(blocks, p)
    check_matrix_fits(p, blocks, dtype, max_matrix_gb, copies=K + 2)
    if out is None:
        out = torch.empty(n, p, dtype=dtype, device=device)
    Ms = _local_phase(G, F, out, offs, ws, foffs, b, blocks, workers, dtype, max_matrix_gb, device, local)
    Qs = [[torch.eye(M.shape[0], dtype=dtype, device=device) - M.to(device) for M in Mk] for Mk in Ms]
    del Ms
    dynamics, squeeze, Vq = _query_vectors(queries, Qs, spans, n, p, dtype, device)
    _propagate(out, offs, b, Qs, spans, Vq, dynamics, dtype, device)
    if dynamics is not None:
        dynamics = dynamics.cpu()
        if squeeze:
            dynamics = dynamics[..., 0]
    return Algorithm2Result(out, [_as_output(Q, blocks) for Q in Qs], dynamics)


def _local_phase(G, F, out, offs, ws, foffs, b, blocks, workers, dtype, max_matrix_gb, device,
                 local) -> list[list[torch.Tensor]]:
    """Algorithm 2's first phase: every segment's Algorithm 1 alone (its local rows into
    ``out``), returning each segment's M_k per block — given (``local``), in worker
    processes, or here."""
    K = len(b) - 1
    if local is not None:
        if sorted(local) != list(range(K)):
            raise ValueError(f"local propagators given for segments {sorted(local)}, expected 0..{K - 1}")
        return [_as_list(local[k]) for k in range(K)]
    if workers <= 0:
        done = segment_recursions(G, offs, ws, b, range(K), F=F, f_offsets=foffs if F is not None else None,
                                  blocks=blocks, out=out, dtype=dtype, max_matrix_gb=max_matrix_gb, device=device)
        return [_as_list(done[k]) for k in range(K)]
    jobs = []
    for k in range(K):
        s0, s1 = b[k], b[k + 1]
        seg_offs = [o - offs[s0] for o in offs[s0 : s1 + 1]]
        seg_foffs = None if F is None else [o - foffs[s0] for o in foffs[s0 : s1 + 1]]
        jobs.append((k, s0, s1, seg_offs, ws[s0:s1], seg_foffs))
    Ms: list[list[torch.Tensor]] = [[] for _ in range(K)]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # torch imported once, in the (fresh) server
    out_is_file = isinstance(_ref(out, 0, 0), tuple)
    with ProcessPoolExecutor(max_workers=min(workers, K), mp_context=ctx) as pool:
        futs = {
            k: pool.submit(
                _segment_job, _ref(G, offs[s0], offs[s1]),
                _ref(F, foffs[s0], foffs[s1]),
                _ref(out, offs[s0], offs[s1]) if out_is_file else None,
                so, sw, sf, blocks, dtype, max_matrix_gb, 1,
            )
            for k, s0, s1, so, sw, sf in jobs
        }
        for k, s0, s1, *_ in jobs:
            E_loc, M = futs[k].result()
            if E_loc is not None:
                _write(out, offs[s0], offs[s1], E_loc)
            Ms[k] = _as_list(M)
    return Ms


def _query_vectors(queries, Qs, spans, n: int, p: int, dtype, device):
    """The query vectors per segment, V[k][j] = (Q_{j−1} ⋯ Q_{k+1})ᵀ u_j for j > k, and the
    NaN-filled ``dynamics`` [n, K, Q] they fill; ``(None, True, [{}…])`` without queries."""
    K = len(Qs)
    dynamics, squeeze, Vq = None, True, [dict() for _ in range(K)]
    if not queries:
        return dynamics, squeeze, Vq
    us = {int(j): torch.as_tensor(u).to(device=device, dtype=dtype) for j, u in queries.items()}
    if any(not 1 <= j <= K for j in us):
        raise ValueError(f"query checkpoints must lie in 1..K={K}: {sorted(us)}")
    squeeze = all(u.dim() == 1 for u in us.values())
    us = {j: u.reshape(p, -1) for j, u in us.items()}
    nq = {u.shape[1] for u in us.values()}
    if len(nq) != 1:
        raise ValueError("all query matrices must have the same number of columns")
    dynamics = torch.full((n, K, nq.pop()), float("nan"), dtype=dtype, device=device)
    for j, u in us.items():
        v = u.clone()
        for k in range(j - 1, -1, -1):
            Vq[k][j] = v.clone()
            for s, Q in zip(spans, Qs[k], strict=True):
                v[s] = Q.T @ v[s]
    return dynamics, squeeze, Vq


def _propagate(out, offs, b, Qs, spans, Vq, dynamics, dtype, device) -> None:
    """Algorithm 2's second phase, in place: segment k's local rows times the suffix
    S_k = Q_{K−1} ⋯ Q_{k+1} (last segment first, so S grows by one factor per segment),
    and the dynamics columns of its rows."""
    S = None
    for k in range(len(Qs) - 1, -1, -1):
        for r0 in range(offs[b[k]], offs[b[k + 1]], _ROW_CHUNK):
            r1 = min(r0 + _ROW_CHUNK, offs[b[k + 1]])
            E_loc = _rows(out, r0, r1, dtype, device)
            for j, v in Vq[k].items():
                dynamics[r0:r1, j - 1] = E_loc @ v
            if S is not None:
                E_fin = torch.empty_like(E_loc)
                for s, Sb in zip(spans, S, strict=True):
                    E_fin[:, s] = E_loc[:, s] @ Sb.T
                _write(out, r0, r1, E_fin)
        if k > 0:  # S_{k−1} = S_k Q_k; the product after the first segment would go unused
            S = [Q.clone() for Q in Qs[k]] if S is None else [Sb @ Q for Sb, Q in zip(S, Qs[k], strict=True)]


def segment_recursions(
    G: Array,
    offsets,
    w,
    boundaries: Sequence[int],
    segments: Sequence[int],
    *,
    F: Array | None = None,
    f_offsets=None,
    blocks: Blocks = None,
    out: Array,
    dtype: torch.dtype = torch.float64,
    max_matrix_gb: float = 8.0,
    device: Device = "cpu",
) -> dict[int, Any]:
    """The first phase of :func:`algorithm2` for ``segments`` only: Algorithm 1 inside each
    (M = 0 at its end), local embeddings written to their rows of ``out`` [N_occ, p], and
    {k: M_k} returned — what one of several processes computes before
    ``algorithm2(..., local=…)`` combines all segments (segments are independent here)."""
    offs, ws, foffs = _prepare(G, offsets, w, F, f_offsets)
    b = [int(x) for x in boundaries]
    result = {}
    for k in segments:
        s0, s1 = b[k], b[k + 1]
        so = [o - offs[s0] for o in offs[s0 : s1 + 1]]
        sf = None if F is None else [o - foffs[s0] for o in foffs[s0 : s1 + 1]]
        Fk = None if F is None else F[foffs[s0] : foffs[s1]]
        _, M = algorithm1(G[offs[s0] : offs[s1]], so, ws[s0:s1], F=Fk, f_offsets=sf, blocks=blocks,
                          out=out[offs[s0] : offs[s1]], dtype=dtype, max_matrix_gb=max_matrix_gb, device=device)
        result[int(k)] = M
    return result


def column_part(blocks: Sequence[slice], p: int, first: int, last: int) -> tuple[slice, list[slice]]:
    """Blocks ``first:last`` (in coordinate order) as one column range of [0, p) and their
    slices relative to it: the part of a block-diagonal Algorithm 1 that one process runs
    alone (each block's M follows the recursion independently of the others)."""
    spans = _spans(blocks, p)[first:last]
    if not spans:
        return slice(0, 0), []
    c0, c1 = spans[0].start, spans[-1].stop
    return slice(c0, c1), [slice(s.start - c0, s.stop - c0) for s in spans]


# ----------------------------------------------------------------------------- views
def per_index_views(E_or_scores: Array, indices, steps):
    """Per training index: (unique_indices [n_unique], all_epoch_sum [n_unique, ...],
    last_occurrence [n_unique, ...]). ``indices``/``steps`` [N_occ] give each row's
    training-set index and step; all-epoch removal sums a point's occurrences, single-epoch
    (last-epoch) removal takes the row of its latest step. Returns torch tensors."""
    idx, st = (
        (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64)
        for x in (indices, steps)
    )
    n = idx.shape[0]
    if E_or_scores.shape[0] != n or st.shape[0] != n:
        raise ValueError("E_or_scores, indices and steps must have the same number of rows")
    uniq, inv = np.unique(idx, return_inverse=True)
    order = np.lexsort((np.arange(n), st, inv))  # by index, then step, then row
    ends = np.flatnonzero(np.append(inv[order][1:] != inv[order][:-1], True))
    last_rows = torch.as_tensor(order[ends])
    inv_t = torch.as_tensor(inv.reshape(-1))
    first = _rows(E_or_scores, 0, 0, torch.float64)
    total = torch.zeros((len(uniq), *first.shape[1:]), dtype=torch.float64)
    last = torch.empty_like(total)
    pos = torch.full((n,), -1, dtype=torch.long)
    pos[last_rows] = torch.arange(len(uniq))
    for r0 in range(0, n, _ROW_CHUNK):
        r1 = min(r0 + _ROW_CHUNK, n)
        chunk = _rows(E_or_scores, r0, r1, torch.float64)
        total.index_add_(0, inv_t[r0:r1], chunk)
        keep = pos[r0:r1] >= 0
        last[pos[r0:r1][keep]] = chunk[keep]
    return torch.as_tensor(uniq), total, last
