"""AdamW-aware data value embeddings: Algorithm 1 through the linearised AdamW map.

Core maths only (tensors in, tensors out). The stage that feeds it from a recorded run is
``embed_adamw.py``.

The perturbation of leaving z out of step t lives in the optimizer state (θ, m, v). Each
step's tangent map (SPEC §2 "Adam", :class:`dve_repro.optim.AdamWLinearization`) is

    δg̃ = c δg − s g (gᵀδg),                   δg = H δθ (+ −g_t(z)/|B| at the removal step)
    δm' = β₁δm + (1−β₁)δg̃,   δv' = β₂δv + γ∘δg̃,          γ = 2(1−β₂) g̃
    δθ' = ρ δθ + μ∘δm + κ∘δv + α∘δg̃,                      ρ = 1−ηλ,  μ = −aDβ₁,  κ = aKβ₂,
                                                           α = −aD(1−β₁) + aKγ

The state lives in a p̃-dimensional subspace δθ = Πᵀx (likewise m, v); the diagonal
coefficients become operators Π diag(·) Πᵀ: exact diagonals when Π selects coordinates
(``mask``), Kronecker products of two small matrices when Π = P_out ⊗ P_in and the
coefficient is factored as r cᵀ (``kron``). With the curvature substituted by factor rows
F_t (H ≈ FᵀF/|B|; F = G is the empirical Fisher) the θ-row of the product of later steps,
A = (A_θ, A_m, A_v) (each p̃×p̃), follows a backward recursion, Algorithm 1's analogue:

    A_θ, A_m, A_v ← I, 0, 0
    for t = T−1 … 0:
        R   = A_θ·α + (1−β₁) A_m + A_v·γ          (·d: right-multiplication by the operator d)
        Rc  = c R − s (R g)(g)ᵀ                    (clipping; c = 1, s = 0 when inactive)
        E_t = −(1/|B|) G_t Rcᵀ                     (this step's embeddings, TSLOO sign)
        A_θ, A_m, A_v ← ρ A_θ + Rc FᵀF/|B|,  A_θ·μ + β₁ A_m,  A_θ·κ + β₂ A_v

A test-independent embedding: the predicted change of any query's loss is ⟨Πu, E_t(z)⟩
with u the query gradient at θ_T. One A per layer (``blocks``) is the block-diagonal
variant, as the paper does for M. With β₁ = β₂ = 0 terms switched off and D = 1 it reduces
to the SGD recursion; :func:`naive_embeddings` builds the 3p̃×3p̃ Jacobians explicitly and is
the float64 oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

# A diagonal operator on one block: a vector [p_b] (exact diagonal), a Kronecker pair
# (L_out [k_o, k_o], L_in [k_i, k_i]) acting on coordinates laid out as [k_o, k_i], or a list
# of (slice, operator) pieces that together cover the block (one piece per parameter), or an
# :class:`OpSum` of operators on the same coordinates.
Op = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | list


class OpSum(tuple):
    """The sum of several operators on the same coordinates (e.g. two Kronecker pairs)."""


@dataclass
class AdamWStep:
    """What one step contributes, in the projected space of dimension p̃.

    ``G`` [B, p̃] per-sample gradients Π∇ℓ(θ_t, z); ``F`` [R, p̃] curvature factor rows
    (None: F = G, the empirical Fisher) with H ≈ FᵀF / n; ``g`` [p̃] the projected pre-clip
    batch gradient; ``ops`` maps ``alpha``/``gamma``/``mu``/``kappa`` to one :data:`Op` per
    block; ``rho``, ``beta1``, ``beta2``, ``c``, ``s`` the step's scalars."""

    G: torch.Tensor
    n: int
    g: torch.Tensor
    ops: dict[str, list[Op]]
    rho: float
    beta1: float
    beta2: float
    c: float = 1.0
    s: float = 0.0
    F: torch.Tensor | None = None


def _right(A: torch.Tensor, op: Op) -> torch.Tensor:
    """A · op for A [r, p_b] and a block operator (diagonal vector, Kronecker pair, pieces)."""
    if isinstance(op, torch.Tensor):
        return A * op
    if isinstance(op, list):
        return torch.cat([_right(A[:, sl], piece) for sl, piece in op], dim=1)
    if isinstance(op, OpSum):
        return sum(_right(A, o) for o in op)
    lo, li = op
    r = A.shape[0]
    X = A.reshape(r, lo.shape[0], li.shape[0])
    # (A (L_o ⊗ L_i))[r, (c, d)] = Σ_{a,b} A[r, (a, b)] L_o[a, c] L_i[b, d]: two batched matmuls
    return torch.matmul(lo.T, torch.matmul(X, li)).reshape(r, -1)


def _add_right(out: torch.Tensor, A: torch.Tensor, op: Op) -> None:
    """out += A · op, in place (fused for a diagonal operator)."""
    if isinstance(op, torch.Tensor):
        out.addcmul_(A, op)
    else:
        out.add_(_right(A, op))


def block_spans(p: int, sizes: Sequence[int] | None) -> list[slice]:
    """Contiguous spans of the blocks (one span over [0, p) when ``sizes`` is None)."""
    if sizes is None:
        return [slice(0, p)]
    spans, pos = [], 0
    for n in sizes:
        spans.append(slice(pos, pos + n))
        pos += n
    if pos != p:
        raise ValueError(f"block sizes {list(sizes)} do not add up to p̃={p}")
    return spans


def algorithm1_adamw(
    steps: Iterable[tuple[int, AdamWStep]],
    p: int,
    block_sizes: Sequence[int] | None = None,
    *,
    emit: Callable[[int, torch.Tensor], None],
    rows: int = 1,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Run the backward recursion over ``steps`` given as (t, step) from t = T−1 down to 0.

    ``rows=1`` propagates the θ-row (I, 0, 0): ``emit(t, E_t)`` receives the embeddings
    [B, p̃] (influence on θ at the end of ``steps``). ``rows=3`` propagates all three rows
    of the state map (Algorithm 2's segments): E_t is [B, 3·p̃], the perturbation of
    (θ, m, v) at the end, laid out [B, 3, p̃]. Returns, per block, the product of the
    steps' Jacobians as a [rows·p_b, 3·p_b] matrix (columns θ, m, v).
    ``block_sizes``: one recursion per block (coordinates contiguous); the clip term couples
    blocks through gᵀδg and is kept within each block (block-diagonal approximation)."""
    if rows not in (1, 3):
        raise ValueError("rows must be 1 (θ-row) or 3 (the whole state map)")
    spans = block_spans(p, block_sizes)
    At, Am, Av = [], [], []
    for sp in spans:
        pb = sp.stop - sp.start
        eye = torch.eye(pb, dtype=dtype, device=device)
        zero = torch.zeros(pb, pb, dtype=dtype, device=device)
        At.append(torch.cat([eye, zero, zero][:rows]))  # rows stacked: θ, m, v
        Am.append(torch.cat([zero, eye, zero][:rows]))
        Av.append(torch.cat([zero, zero, eye][:rows]))
    for t, st in steps:
        G = st.G.to(dtype=dtype, device=device)
        F = G if st.F is None else st.F.to(dtype=dtype, device=device)
        g = st.g.to(dtype=dtype, device=device)
        E = torch.empty(G.shape[0], rows, p, dtype=dtype, device=device)
        for b, sp in enumerate(spans):
            # R = A_θ·α + (1−β₁)A_m + A_v·γ, then the clip (c R − s (R g) gᵀ); in place where
            # the operator is diagonal: the recursion is memory-bound in these p̃² passes
            R = Am[b] * (1 - st.beta1)
            _add_right(R, At[b], st.ops["alpha"][b])
            _add_right(R, Av[b], st.ops["gamma"][b])
            if st.s != 0.0:
                gb = g[sp]
                Rg = R @ gb
                R.mul_(st.c).addr_(Rg, gb, alpha=-st.s)
            elif st.c != 1.0:
                R.mul_(st.c)
            E[:, :, sp] = torch.mm(G[:, sp], R.T).mul_(-1.0 / st.n).reshape(G.shape[0], rows, -1)
            Fb = F[:, sp]
            Am[b].mul_(st.beta1)
            _add_right(Am[b], At[b], st.ops["mu"][b])
            Av[b].mul_(st.beta2)
            _add_right(Av[b], At[b], st.ops["kappa"][b])
            At[b].mul_(st.rho).addmm_(torch.mm(R, Fb.T), Fb, alpha=1.0 / st.n)
        emit(t, E.reshape(G.shape[0], rows * p))
    return [torch.cat([At[b], Am[b], Av[b]], dim=1) for b in range(len(spans))]


def algorithm2_adamw(
    segments: Sequence[Sequence[tuple[int, AdamWStep]]],
    p: int,
    block_sizes: Sequence[int] | None = None,
    *,
    emit: Callable[[int, torch.Tensor], None],
    queries: Sequence[torch.Tensor] | None = None,
    emit_dynamics: Callable[[int, torch.Tensor], None] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> None:
    """Algorithm 2 for AdamW: ``segments[k]`` holds segment k's steps (backward order),
    segments in time order. Each segment runs :func:`algorithm1_adamw` alone (rows=3: its
    local embeddings are perturbations of the whole state at the segment's end, its
    propagator Φ_k the whole state map); they are independent, so they can run anywhere in
    parallel. The final embedding of a segment-k point is A_k e_local with A_k the θ-row of
    Φ_{K−1} ⋯ Φ_{k+1} (later on the left), built as a suffix product.

    Data value dynamics: with ``queries[j−1]`` = u_j [p̃] (the query gradient at the end of
    segment j−1, i.e. checkpoint b_j), ``emit_dynamics(t, D_t)`` gets D_t [B, K] with
    D_t[:, j−1] = u_jᵀ θ-row(Φ_{j−1} ⋯ Φ_{k+1}) e_local for j > k and NaN for j ≤ k."""
    spans = block_spans(p, block_sizes)
    K = len(segments)
    if queries is not None and len(queries) != K:
        raise ValueError(f"need one query per segment end ({K}), got {len(queries)}")
    local = []
    for seg in segments:
        store: dict[int, torch.Tensor] = {}
        phi = algorithm1_adamw(
            seg, p, block_sizes, emit=store.__setitem__, rows=3, dtype=dtype, device=device
        )
        local.append((store, phi))

    def theta_row(vec_or_eye):
        out = []
        for sp in spans:
            pb = sp.stop - sp.start
            head = vec_or_eye(sp, pb)
            out.append(
                torch.cat(
                    [head, torch.zeros(head.shape[0], 2 * pb, dtype=dtype, device=device)], dim=1
                )
            )
        return out

    A = theta_row(lambda sp, pb: torch.eye(pb, dtype=dtype, device=device))
    rvec: dict[int, list[torch.Tensor]] = {}  # j → u_jᵀ W_{k,j} per block, [1, 3 p_b]
    for k in range(K - 1, -1, -1):
        store, phi = local[k]
        if queries is not None:
            u = queries[k].to(dtype=dtype, device=device)
            rvec[k + 1] = theta_row(lambda sp, pb, u=u: u[sp].reshape(1, -1))
        for t, e in store.items():
            e = e.reshape(e.shape[0], 3, p)
            out = torch.empty(e.shape[0], p, dtype=dtype, device=device)
            parts = [e[:, :, sp].reshape(e.shape[0], -1) for sp in spans]
            for b, sp in enumerate(spans):
                out[:, sp] = parts[b] @ A[b].T
            emit(t, out)
            if emit_dynamics is not None and queries is not None:
                dyn = torch.full((e.shape[0], K), float("nan"), dtype=dtype, device=device)
                for j, r in rvec.items():
                    dyn[:, j - 1] = sum(parts[b] @ r[b][0] for b in range(len(spans)))
                emit_dynamics(t, dyn)
        A = [A[b] @ phi[b] for b in range(len(spans))]
        rvec = {j: [r[b] @ phi[b] for b in range(len(spans))] for j, r in rvec.items()}


# ----------------------------------------------------------------------------- oracle
def _dense_op(op: Op) -> torch.Tensor:
    if isinstance(op, torch.Tensor):
        return torch.diag(op)
    if isinstance(op, list):
        return torch.block_diag(*[_dense_op(piece) for _, piece in op])
    if isinstance(op, OpSum):
        return sum(_dense_op(o) for o in op)
    return torch.kron(op[0], op[1])


def naive_embeddings(
    steps: Sequence[AdamWStep], p: int, block_sizes: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Reference: explicit 3p̃×3p̃ Jacobians J_t and the push b_t(z), multiplied out:
    E_t(z) = [I 0 0] J_{T−1} ⋯ J_{t+1} b_t(z). ``steps[t]`` is step t. float64, small p̃ only."""
    spans = block_spans(p, block_sizes)
    T = len(steps)

    def full(name: str, st: AdamWStep) -> torch.Tensor:
        out = torch.zeros(p, p, dtype=torch.float64)
        for b, sp in enumerate(spans):
            out[sp, sp] = _dense_op(st.ops[name][b]).double()
        return out

    def clip(st: AdamWStep) -> torch.Tensor:
        C = st.c * torch.eye(p, dtype=torch.float64)
        g = st.g.double()
        for sp in spans:  # the clip's rank-one term is kept within each block
            C[sp, sp] -= st.s * torch.outer(g[sp], g[sp])
        return C

    def blockdiag(X: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(X)
        for sp in spans:
            out[sp, sp] = X[sp, sp]
        return out

    eye, Z = torch.eye(p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64)
    jac, push = [], []
    for st in steps:
        F = (st.G if st.F is None else st.F).double()
        H = blockdiag(F.T @ F / st.n)
        Cl = clip(st)
        dgt_theta = Cl @ H  # δg̃ from δθ
        alpha, gamma, mu, kappa = (full(k, st) for k in ("alpha", "gamma", "mu", "kappa"))
        beta1, beta2 = st.beta1, st.beta2
        # rows: θ', m', v'; columns: θ, m, v  (dense 3p̃ × 3p̃)
        J = torch.cat(
            [
                torch.cat([st.rho * eye + alpha @ dgt_theta, mu, kappa], 1),
                torch.cat([(1 - beta1) * dgt_theta, beta1 * eye, Z], 1),
                torch.cat([gamma @ dgt_theta, Z, beta2 * eye], 1),
            ],
            0,
        )
        jac.append(J)
        B = torch.cat([alpha @ Cl, (1 - beta1) * Cl, gamma @ Cl], 0)  # δ(θ', m', v') per unit δg
        push.append(B @ (-(st.G.double().T) / st.n))  # [3p̃, B]
    out: list[torch.Tensor] = [torch.empty(0)] * T
    S = torch.cat([eye, Z, Z], 1)  # θ-row of the product of later steps
    for t in range(T - 1, -1, -1):
        out[t] = (S @ push[t]).T
        S = S @ jac[t]
    return out
