"""Oracles for the DVEmb linear algebra (float64, small random problems)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dve_repro.embedding import (
    algorithm1,
    algorithm2,
    check_matrix_fits,
    estimate_matrix_bytes,
    explicit_embeddings,
    matrix_free_scores,
    per_index_views,
)
from dve_repro.errors import DveError

P = 12
BLOCKS = [slice(0, 5), slice(5, 9), slice(9, 12)]


def make_problem(seed: int, T: int = 7, p: int = P, f_rows: int = 0):
    """Random trajectory: batch sizes 2..5, w_t in [0.01, 0.3]; optional F with f_rows per point."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 6, (T,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    n = int(offsets[-1])
    G = torch.randn(n, p, generator=gen, dtype=torch.float64)
    w = 0.01 + 0.29 * torch.rand(T, generator=gen, dtype=torch.float64)
    F = f_offsets = None
    if f_rows:
        F = 0.7 * torch.randn(n * f_rows, p, generator=gen, dtype=torch.float64)
        f_offsets = offsets * f_rows
    return G, offsets, w, F, f_offsets


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


def explicit_product(G, offsets, w, F, f_offsets, blocks):
    """Π_t (I − w_t H_t) over all steps, latest on the left, built explicitly."""
    p = G.shape[1]
    Fm, fo = (G, offsets) if F is None else (F, f_offsets)
    mask = torch.zeros(p, p, dtype=torch.float64)
    for s in blocks or [slice(0, p)]:
        mask[s, s] = 1
    P_ = torch.eye(p, dtype=torch.float64)
    for t in range(len(w)):
        f = Fm[fo[t] : fo[t + 1]]
        P_ = (torch.eye(p, dtype=torch.float64) - w[t] * (f.T @ f) * mask) @ P_
    return P_


def block_diag(Ms, blocks, p=P):
    out = torch.zeros(p, p, dtype=torch.float64)
    if blocks is None:
        return Ms
    for s, M in zip(blocks, Ms, strict=True):
        out[s, s] = M
    return out


CASES = [(None, 0), (BLOCKS, 0), (None, 3), (BLOCKS, 3)]


@pytest.mark.parametrize(("blocks", "f_rows"), CASES)
def test_algorithm1_matches_explicit_and_m_final(blocks, f_rows):
    G, offsets, w, F, fo = make_problem(1 + f_rows, f_rows=f_rows)
    steps_seen = []
    E, M = algorithm1(
        G, offsets, w, F=F, f_offsets=fo, blocks=blocks, chunk_steps=3, progress=steps_seen.append
    )
    assert sum(steps_seen) == len(w) and steps_seen == [3, 3, 1]
    E_ref = explicit_embeddings(G, offsets, w, F=F, f_offsets=fo, blocks=blocks)
    assert rel(E, E_ref) < 1e-10
    if blocks is not None:
        assert isinstance(M, list) and len(M) == len(blocks)
        # off-block coordinates never mix
        Gx = G.clone()
        Gx[:, 5:] = 0
        Ex, _ = algorithm1(Gx, offsets, w, F=F, f_offsets=fo, blocks=blocks)
        assert rel(Ex[:, :5], E[:, :5]) < 1e-10
    M_full = block_diag(M, blocks)
    prod = explicit_product(G, offsets, w, F, fo, blocks)
    assert rel(torch.eye(P, dtype=torch.float64) - M_full, prod) < 1e-10
    # M is genuinely non-symmetric
    assert rel(M_full, M_full.T) > 1e-6


def test_explicit_embeddings_first_principles():
    """Hand-check of Eq. 1 on 2 steps: E_0 = w_0 (I − w_1 g_1 g_1ᵀ) g_0, E_1 = w_1 g_1."""
    G = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    offsets, w = [0, 1, 2], [0.1, 0.2]
    E = explicit_embeddings(G, offsets, w)
    g0, g1 = G[0], G[1]
    e0 = 0.1 * (g0 - 0.2 * g1 * (g1 @ g0))
    assert torch.allclose(E[0], e0) and torch.allclose(E[1], 0.2 * g1)
    E1, _ = algorithm1(G, offsets, w)
    assert torch.allclose(E1, E)


@pytest.mark.parametrize(("blocks", "f_rows"), CASES)
def test_matrix_free_matches_algorithm1(blocks, f_rows):
    G, offsets, w, F, fo = make_problem(10 + f_rows, f_rows=f_rows)
    V = torch.randn(P, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    E, _ = algorithm1(G, offsets, w, F=F, f_offsets=fo, blocks=blocks)
    S = matrix_free_scores(G, offsets, w, V, F=F, f_offsets=fo, blocks=blocks)
    assert S.shape == (G.shape[0], 4)
    assert rel(S, E @ V) < 1e-10
    s1 = matrix_free_scores(G, offsets, w, V[:, 0], F=F, f_offsets=fo, blocks=blocks)
    assert s1.shape == (G.shape[0],) and rel(s1, E @ V[:, 0]) < 1e-10


def _bounds(T, K):
    return sorted({round(i * T / K) for i in range(K + 1)})


@pytest.mark.parametrize(
    ("K", "blocks", "f_rows", "workers"),
    [
        (1, None, 0, 0),
        (2, None, 0, 0),
        (5, None, 0, 0),
        (1, BLOCKS, 3, 0),
        (2, BLOCKS, 0, 0),
        (5, BLOCKS, 3, 0),
        (5, None, 3, 0),
        (2, BLOCKS, 3, 2),
    ],
)
def test_algorithm2_matches_algorithm1(K, blocks, f_rows, workers):
    T = 7
    G, offsets, w, F, fo = make_problem(20 + K, T=T, f_rows=f_rows)
    b = _bounds(T, K)
    assert len(b) == K + 1
    gen = torch.Generator().manual_seed(99)
    queries = {j: torch.randn(P, 2, generator=gen, dtype=torch.float64) for j in range(1, K + 1)}
    res = algorithm2(G, offsets, w, b, F=F, f_offsets=fo, blocks=blocks, workers=workers,
                     queries=queries)
    E, M = algorithm1(G, offsets, w, F=F, f_offsets=fo, blocks=blocks)
    assert rel(res.embeddings, E) < 1e-10
    assert len(res.propagators) == K
    # product of the propagators is the whole-run propagator
    prod = torch.eye(P, dtype=torch.float64)
    for Q in res.propagators:
        prod = block_diag(Q, blocks) @ prod
    assert rel(prod, torch.eye(P, dtype=torch.float64) - block_diag(M, blocks)) < 1e-10
    dyn = res.dynamics
    assert dyn.shape == (G.shape[0], K, 2)
    # last checkpoint = final-model scores
    assert rel(dyn[:, K - 1], E @ queries[K]) < 1e-10
    # intermediate checkpoints: Algorithm 1 on the prefix [0, b_j), NaN for later rows
    for j in range(1, K):
        n_j = int(offsets[b[j]])
        E_j, _ = algorithm1(G[:n_j], offsets[: b[j] + 1], w[: b[j]],
                            F=None if F is None else F[: int(fo[b[j]])],
                            f_offsets=None if F is None else fo[: b[j] + 1], blocks=blocks)
        assert rel(dyn[:n_j, j - 1], E_j @ queries[j]) < 1e-10
        assert torch.isnan(dyn[n_j:, j - 1]).all()


def test_algorithm2_vector_queries_and_missing_checkpoints():
    G, offsets, w, _, _ = make_problem(3)
    b = [0, 2, 5, 7]
    u = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = algorithm2(G, offsets, w, b, queries={3: u})
    E, _ = algorithm1(G, offsets, w)
    assert res.dynamics.shape == (G.shape[0], 3)
    assert rel(res.dynamics[:, 2], E @ u) < 1e-10
    assert torch.isnan(res.dynamics[:, :2]).all()
    assert res.propagators[0].shape == (P, P)
    with pytest.raises(ValueError):
        algorithm2(G, offsets, w, [0, 3, 3, 7])


@pytest.mark.parametrize("workers", [0, 2])
def test_memmap_in_and_out(tmp_path, workers):
    G, offsets, w, F, fo = make_problem(7, f_rows=2)
    Gm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float64, shape=tuple(G.shape))
    Gm[:] = G.numpy()
    Gm.flush()
    Gr = np.load(tmp_path / "g.npy", mmap_mode="r")
    Fm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float64, shape=tuple(F.shape))
    Fm[:] = F.numpy()
    E_ref, M_ref = algorithm1(G, offsets, w, F=F, f_offsets=fo.numpy())
    out = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float64, shape=tuple(G.shape))
    if workers == 0:
        ret, M = algorithm1(Gr, offsets.numpy(), w.numpy(), F=Fm, f_offsets=fo, out=out,
                            chunk_steps=2)
        assert ret is out
        assert rel(M, M_ref) < 1e-10
    else:
        res = algorithm2(Gr, offsets, w, [0, 3, 5, 7], F=Fm, f_offsets=fo, out=out, workers=workers)
        assert res.embeddings is out
    out.flush()
    assert rel(np.load(tmp_path / "e.npy"), E_ref) < 1e-10
    S = matrix_free_scores(Gr, offsets, w, torch.ones(P, dtype=torch.float64), F=Fm, f_offsets=fo)
    assert rel(S, E_ref.sum(1)) < 1e-10


def test_per_index_views_hand_made():
    # rows: (index, step): (4,0) (2,0) (4,1) (7,2) (2,3) (4,3)
    indices = [4, 2, 4, 7, 2, 4]
    steps = [0, 0, 1, 2, 3, 3]
    scores = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0], dtype=torch.float64)
    uniq, total, last = per_index_views(scores, indices, steps)
    assert uniq.tolist() == [2, 4, 7]
    assert total.tolist() == [10010.0, 100101.0, 1000.0]
    assert last.tolist() == [10000.0, 100000.0, 1000.0]
    E = torch.stack([scores, -scores], dim=1)
    uniq, total, last = per_index_views(E.numpy(), np.array(indices), np.array(steps))
    assert total.tolist() == [[10010.0, -10010.0], [100101.0, -100101.0], [1000.0, -1000.0]]
    assert last[:, 1].tolist() == [-10000.0, -100000.0, -1000.0]
    # the latest step wins even if rows are not ordered by step
    uniq, _, last = per_index_views(torch.tensor([5.0, 6.0]), [1, 1], [3, 2])
    assert last.tolist() == [5.0]


def test_matrix_size_check():
    assert estimate_matrix_bytes(10, None, torch.float64) == 800
    assert estimate_matrix_bytes(10, [slice(0, 4), slice(4, 10)], torch.float32) == (16 + 36) * 4
    check_matrix_fits(1000, None, torch.float64, 8.0)
    with pytest.raises(DveError) as err:
        check_matrix_fits(25450, None, torch.float64, 4.0)
    msg = str(err.value)
    assert "\n" not in msg and "p̃=25450" in msg and "embed.blocks=layer" in msg
    G, offsets, w, _, _ = make_problem(0)
    with pytest.raises(DveError):
        algorithm1(G, offsets, w, max_matrix_gb=1e-9)
    with pytest.raises(DveError):
        algorithm2(G, offsets, w, [0, 7], max_matrix_gb=1e-9)


def test_bad_blocks_rejected():
    G, offsets, w, _, _ = make_problem(0)
    with pytest.raises(ValueError):
        algorithm1(G, offsets, w, blocks=[slice(0, 5), slice(6, 12)])
