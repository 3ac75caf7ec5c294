"""AdamW-aware embedding stage: feeds :func:`embedding_adamw.algorithm1_adamw` from a run.

Reads a finished AdamW training run; replays it once (checkpoint segment by segment, with
the optimizer state) to get, at every step, the per-sample gradients, the batch gradient and
the coefficients of the linearised AdamW step (:class:`dve_repro.optim.AdamWLinearization`),
all mapped into a p̃-dimensional subspace; then runs the backward recursion.

The subspace (``kind``), per parameter tensor viewed as a matrix [out, in] (a vector is
[n, 1]), with k_o = min(k_out, out), k_i = min(k_in, in):

* ``mask`` — a seeded subset of k_o rows × k_i columns (a coordinate subset). Adam's
  diagonal coefficients restrict exactly; nothing is approximated but the confinement of the
  perturbation to the subset.
* ``kron`` — Gaussian P_out [k_o, out] ⊗ P_in [k_i, in] (LoGra-style, N(0, 1/k), identity
  where k ≥ the dimension). Adam's per-coordinate coefficients are replaced by row × column
  factors r cᵀ (the preconditioner from v̂'s row and column sums as Adafactor does, m' and g̃
  by their top singular pair), whose projected operator is the Kronecker pair
  (P_out diag(r) P_out⁺, P_in diag(c) P_in⁺) with P⁺ = Pᵀ(PPᵀ)⁻¹.

Both are scaled to preserve inner products in expectation (the paper's projection
convention): mask coordinates are multiplied by √(out·in / (k_o·k_i)). With every coordinate
kept (k ≥ all dimensions) ``mask`` equals the unprojected AdamW unrolling with the same
curvature (``unroll.adamw_unrolled_scores``), which the tests check; ``kron`` equals it where
the coefficient matrices are rank one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, vmap

from dve_repro import ui
from dve_repro.embedding_adamw import AdamWStep, OpSum, algorithm1_adamw, algorithm2_adamw
from dve_repro.errors import DveError
from dve_repro.grads import per_sample_grads
from dve_repro.optim import AdamWLinearization
from dve_repro.projection import _seed
from dve_repro.replay import TrainedRun, replay
from dve_repro.tasks import logits_of, mc_step_seed

Tensors = dict[str, torch.Tensor]
KINDS = ("mask", "kron")
CURVATURES = ("ef", "gn", "mc")


def _as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1


@dataclass
class Subspace:
    """Per parameter tensor, a map of its [out, in] view to k_o·k_i coordinates."""

    kind: str
    names: list[str]
    shapes: dict[str, tuple[int, int]]
    rows: dict[str, torch.Tensor]  # mask: selected row / column indices; kron: P_out / P_in
    cols: dict[str, torch.Tensor]
    scale: dict[str, float]
    sizes: list[int]

    @classmethod
    def build(cls, params: Tensors, kind: str, k_out: int, k_in: int, seed: int) -> Subspace:
        if kind not in KINDS:
            raise DveError(f"unknown AdamW subspace {kind!r}; choose from {list(KINDS)}")
        names = sorted(params)
        shapes, rows, cols, scale, sizes = {}, {}, {}, {}, []
        for j, name in enumerate(names):
            out, inn = _as_matrix_shape(tuple(params[name].shape))
            ko, ki = min(k_out, out), min(k_in, inn)
            shapes[name] = (out, inn)
            dtype, dev = params[name].dtype, params[name].device
            gen = torch.Generator().manual_seed(_seed(seed, j, 17))
            if kind == "mask":
                rows[name] = torch.sort(torch.randperm(out, generator=gen)[:ko]).values.to(dev)
                cols[name] = torch.sort(torch.randperm(inn, generator=gen)[:ki]).values.to(dev)
                scale[name] = math.sqrt(out * inn / (ko * ki))
            else:
                rows[name] = _gaussian_or_eye(ko, out, gen, dtype, dev)
                cols[name] = _gaussian_or_eye(ki, inn, gen, dtype, dev)
                scale[name] = 1.0
            sizes.append(ko * ki)
        return cls(kind, names, shapes, rows, cols, scale, sizes)

    @property
    def p(self) -> int:
        return sum(self.sizes)

    def project(self, x: Tensors, lead: int = 1) -> torch.Tensor:
        """{name: [*lead_dims, *shape]} → [*lead_dims, p̃] (``lead`` leading dims)."""
        parts = []
        for name in self.names:
            out, inn = self.shapes[name]
            X = x[name].reshape(*x[name].shape[:lead], out, inn)
            if self.kind == "mask":
                Y = X.index_select(lead, self.rows[name]).index_select(lead + 1, self.cols[name])
                Y = Y * self.scale[name]
            else:
                Y = self.rows[name] @ X @ self.cols[name].T
            parts.append(Y.reshape(*Y.shape[:lead], -1))
        return torch.cat(parts, dim=-1)

    def operator(self, coef: Tensors) -> list:
        """``mask``: the restricted diagonal of a per-coordinate coefficient {name: shape}, as
        (slice, vector) pieces in parameter order."""
        pieces, pos = [], 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out, inn = self.shapes[name]
            C = coef[name].reshape(out, inn)
            piece = C.index_select(0, self.rows[name]).index_select(1, self.cols[name]).reshape(-1)
            pieces.append((slice(pos, pos + size), piece))
            pos += size
        return pieces

    def kron_operators(self, lin: AdamWLinearization) -> dict[str, list]:
        """``kron``: the step's four operators from row/column factors (module docstring).

        D = 1/(√v̂+ε) ≈ d_r d_cᵀ from v̂'s row and column sums (Adafactor; ε dropped), m' and
        g̃ by their top singular pair, K = m'/(2b2 √v̂(√v̂+ε)²) ≈ m'∘D³/(2b2). Rows and columns
        that never saw a gradient (v̂ = 0 throughout) get 0: no perturbation reaches them."""
        out: dict[str, list] = {k: [] for k in ("alpha", "gamma", "mu", "kappa")}
        a, b1, b2, bc2 = lin.a, lin.b1, lin.b2, lin.bc2
        pos = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            shp = self.shapes[name]
            V = lin.vhat[name].reshape(shp)
            R, C, tot = V.sum(1), V.sum(0), V.sum()
            q = tot.clamp_min(0) ** 0.25
            dr = torch.where(R > 0, q / R.clamp_min(1e-300).sqrt(), torch.zeros_like(R))
            dc = torch.where(C > 0, q / C.clamp_min(1e-300).sqrt(), torch.zeros_like(C))
            mr, mc = _rank_one(lin.m_new[name].reshape(shp))
            gr, gc = _rank_one(lin.gt[name].reshape(shp))
            kr, kc = mr * dr**3 / (2 * bc2), mc * dc**3  # K's factors
            P, Q = self.rows[name], self.cols[name]

            def pair(r, c, P=P, Q=Q):
                return (_sandwich(P, r), _sandwich(Q, c))

            gamma = pair(2 * (1 - b2) * gr, gc)
            ops = {
                "mu": pair(-a * b1 * dr, dc),
                "kappa": pair(a * b2 * kr, kc),
                "gamma": gamma,
                "alpha": OpSum(
                    (pair(-a * (1 - b1) * dr, dc), pair(a * kr * 2 * (1 - b2) * gr, kc * gc))
                ),
            }
            sl = slice(pos, pos + size)
            for k, v in ops.items():
                out[k].append((sl, v))
            pos += size
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "p_tilde": self.p, "sizes": self.sizes}


def _gaussian_or_eye(k: int, d: int, gen, dtype, device) -> torch.Tensor:
    if k >= d:
        return torch.eye(d, dtype=dtype, device=device)
    return (torch.randn(k, d, generator=gen, dtype=torch.float64) / math.sqrt(k)).to(
        dtype=dtype, device=device
    )


def _rank_one(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-one approximation C ≈ r cᵀ (top singular triple, σ folded into r)."""
    if C.shape[1] == 1:
        return C[:, 0], torch.ones(1, dtype=C.dtype, device=C.device)
    U, S, Vh = torch.linalg.svd(C, full_matrices=False)
    return U[:, 0] * S[0], Vh[0]


def _sandwich(P: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """P diag(d) P⁺ with P⁺ = Pᵀ(PPᵀ)⁻¹: the subspace image of a diagonal operator."""
    if P.shape[0] == P.shape[1] and torch.equal(
        P, torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    ):
        return torch.diag(d)
    left = (P * d) @ P.T
    return torch.linalg.solve(P @ P.T, left.T).T


def _layer_sizes(sub: Subspace, blocks: str) -> list[int] | None:
    if blocks == "full":
        return None
    if blocks == "layer":
        return list(sub.sizes)
    raise DveError(f"embed.blocks={blocks!r}: choose full or layer")


def adamw_embedding(
    run: TrainedRun,
    kind: str,
    k_out: int,
    k_in: int,
    seed: int,
    curvature: str = "ef",
    blocks: str = "layer",
    mc_seed: int = 0,
    algorithm: int = 1,
    segments: int = 4,
) -> tuple[np.ndarray, Subspace]:
    """Test-independent AdamW embeddings of every occurrence: E [N_occ, p̃] and the subspace
    that maps a query gradient to the same coordinates (score = ⟨Π u, E⟩). ``algorithm=2``
    cuts [0, T) into ``segments`` equal segments (Algorithm 2; same numbers)."""
    if algorithm not in (1, 2):
        raise DveError(f"embed.algorithm={algorithm}: choose 1 or 2")
    check_run(run, curvature)
    sub = Subspace.build(run.load_params(0)[0], kind, k_out, k_in, seed)
    bounds = None
    if algorithm == 2:
        bounds = [
            int(c)
            for c in np.unique(np.linspace(0, run.T, max(1, segments) + 1).round().astype(int))
        ]
    E, _ = embed_in_subspace(run, sub, curvature, blocks, mc_seed, bounds)
    return E, sub


def check_run(run: TrainedRun, curvature: str) -> None:
    if run.cfg.optim.name != "adamw":
        raise DveError(
            "the AdamW-aware embedding needs a run trained with optim=adamw "
            f"(this one used {run.cfg.optim.name}); drop embed.optimizer_aware"
        )
    if curvature not in CURVATURES:
        raise DveError(f"AdamW embedding curvature {curvature!r}: choose from {list(CURVATURES)}")
    if curvature == "gn" and run.task.kind == "lm":
        raise DveError(
            "Gauss-Newton factors are defined for classifiers here; use curvature ef or mc"
        )


def embed_in_subspace(
    run: TrainedRun,
    sub: Subspace,
    curvature: str,
    blocks: str,
    mc_seed: int = 0,
    bounds: list[int] | None = None,
    queries: list[torch.Tensor] | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """E [N_occ, p̃] (into ``out`` when given) and, for Algorithm 2 (``bounds`` = segment cuts)
    with ``queries`` (u_j [p̃] at each cut b_1..b_K), the dynamics [N_occ, K]."""
    task, traj, o = run.task, run.traj, run.cfg.optim
    sizes = _layer_sizes(sub, blocks)  # refuse a bad choice before the replay
    offsets = traj.offsets()
    steps: list[AdamWStep | None] = [None] * run.T
    with ui.bar(f"adamw linearisation ({sub.kind})", total=run.T, unit="step") as bar:
        for a, b in itertools.pairwise(run.checkpoints):

            def collect(t, theta, state):
                steps[t] = _step_data(
                    task,
                    traj,
                    o,
                    sub,
                    t,
                    theta,
                    state,
                    curvature,
                    mc_seed,
                    run.device,
                    per_layer=blocks == "layer",
                )
                bar.update(1)

            replay(run, start=a, stop=b, with_state=True, before_step=collect)
    E = np.zeros((int(offsets[-1]), sub.p)) if out is None else out
    dynamics = None
    if bounds is not None and queries is not None:
        dynamics = np.full((int(offsets[-1]), len(bounds) - 1), np.nan)

    def emit(t: int, rows: torch.Tensor) -> None:
        E[offsets[t] : offsets[t + 1]] = rows.cpu().numpy()

    def emit_dynamics(t: int, rows: torch.Tensor) -> None:
        dynamics[offsets[t] : offsets[t + 1]] = rows.cpu().numpy()

    algo = 1 if bounds is None else 2
    with ui.bar(f"algorithm {algo} adamw ({sub.kind})", total=run.T, unit="step") as bar:

        def backward(a: int, b: int):
            for t in range(b - 1, a - 1, -1):
                yield t, steps[t]
                steps[t] = None  # free the step as soon as it is used
                bar.update(1)

        if bounds is None:
            algorithm1_adamw(
                backward(0, run.T), sub.p, sizes, emit=emit, dtype=torch.float64, device=run.device
            )
        else:
            segs = [list(backward(int(a), int(b))) for a, b in itertools.pairwise(bounds)]
            algorithm2_adamw(
                segs,
                sub.p,
                sizes,
                emit=emit,
                queries=queries,
                emit_dynamics=emit_dynamics if dynamics is not None else None,
                dtype=torch.float64,
                device=run.device,
            )
    return E, dynamics


class SubspaceFeaturizer:
    """Query gradients mapped into an AdamW embedding's subspace: ``features(θ, x, y)`` [N, p̃]
    (the interface of :class:`dve_repro.capture.Featurizer` that scoring uses)."""

    def __init__(self, task, sub: Subspace, seed: int, k_out: int, k_in: int):
        self.task, self.sub, self.seed, self.k = task, sub, seed, (k_out, k_in)
        self.projector = self  # scoring asks feat.projector.describe() / out_dim
        self.out_dim = sub.p

    @classmethod
    def for_config(cls, cfg, run: TrainedRun) -> SubspaceFeaturizer:
        e = cfg.embed
        sub = Subspace.build(
            run.load_params(0)[0],
            e.adamw_subspace,
            e.adamw_k_out,
            e.adamw_k_in,
            cfg.projection.seed,
        )
        return cls(run.task, sub, cfg.projection.seed, e.adamw_k_out, e.adamw_k_in)

    def describe(self) -> dict:
        return {
            **self.sub.describe(),
            "seed": self.seed,
            "k_out": self.k[0],
            "k_in": self.k[1],
            "subspace": "adamw",
        }

    def features(self, params: Tensors, x, y) -> torch.Tensor:
        return self.sub.project(per_sample_grads(self.task.per_sample_loss, params, x, y))


def check_fits(cfg, run: TrainedRun) -> None:
    """Refuse before any work when the recursion's matrices (3 per block, 3 rows more for
    Algorithm 2) or E would not fit the configured budget / the disk."""
    from dve_repro import artifacts

    check_run(run, cfg.embed.curvature)
    feat = SubspaceFeaturizer.for_config(cfg, run)
    sizes = _layer_sizes(feat.sub, cfg.embed.blocks) or [feat.sub.p]
    copies = 3 if cfg.embed.algorithm == 1 else 3 * 3 * max(1, cfg.embed.segments)
    gb = copies * sum(n * n for n in sizes) * 8 / 1e9
    if gb > cfg.embed.max_matrix_gb:
        raise DveError(
            f"the AdamW recursion needs {gb:.1f} GB of matrices (p̃={feat.sub.p}, "
            f"{len(sizes)} blocks); use embed.blocks=layer or smaller embed.adamw_k_out/k_in "
            f"(limit embed.max_matrix_gb={cfg.embed.max_matrix_gb:g})"
        )
    n_rows = int(run.traj.offsets()[-1])
    artifacts.ensure_space(
        run.path.parent, n_rows * feat.sub.p * 8 * 2, "the AdamW embedding (E and scores)"
    )


def embed_stage(cfg, run: TrainedRun, rd, bounds: list[int] | None) -> None:
    """The embed stage with ``embed.optimizer_aware=true``: E (Algorithm 1 or 2 through the
    linearised AdamW map), then the same outputs as the SGD recursion (embed_stage.py)."""
    import time

    from dve_repro import artifacts
    from dve_repro.embed_stage import finish_embedding

    feat = SubspaceFeaturizer.for_config(cfg, run)
    timings: dict[str, float] = {}
    queries = None
    if bounds is not None:  # the mean validation loss at each segment end (data value dynamics)
        final = run.final_params()
        queries = []
        for b in bounds[1:]:
            params = final if b == run.T else run.load_params(b)[0]
            queries.append(feat.features(params, run.task.x_val, run.task.y_val).mean(0))
    n_rows = int(run.traj.offsets()[-1])
    E = artifacts.create_npy(
        rd.file("E.npy.partial"), (n_rows, feat.sub.p), cfg.embed.storage_dtype
    )
    t0 = time.perf_counter()
    _, dynamics = embed_in_subspace(
        run,
        feat.sub,
        cfg.embed.curvature,
        cfg.embed.blocks,
        cfg.embed.mc_seed,
        bounds,
        queries,
        out=E,
    )
    E.flush()
    del E
    timings["algorithm_s"] = time.perf_counter() - t0
    meta = {
        "projection": feat.describe(),
        "curvature": cfg.embed.curvature,
        "layers": feat.sub.names,
        "left_out": "nothing (all parameters)",
        "p_tilde": feat.sub.p,
        "gradient_bytes": 0,
    }
    finish_embedding(cfg, run, rd, feat, dynamics, bounds, timings, meta)


def _step_data(
    task,
    traj,
    o,
    sub: Subspace,
    t: int,
    theta: Tensors,
    state: Tensors,
    curvature: str,
    mc_seed: int,
    device,
    per_layer: bool,
) -> AdamWStep:
    from dve_repro.train import step_grads

    x, y = task.batch(traj.batches[t])
    n = int(x.shape[0])
    _, g = step_grads(task, theta, x, y, traj.weights(t, dtype=task.weight_dtype, device=device))
    lin = AdamWLinearization(theta, state, g, float(traj.lrs[t]), t, o)
    alpha, gamma, _ = lin.coefficients()
    mu = {k: -lin.a * lin.D[k] * lin.b1 for k in lin.D}
    kappa = {k: lin.a * lin.K[k] * lin.b2 for k in lin.K}
    G = sub.project(per_sample_grads(task.per_sample_loss, theta, x, y))
    F = (
        None
        if curvature == "ef"
        else sub.project(_factor_grads(task, theta, x, y, curvature, mc_step_seed(mc_seed, t)))
    )
    if sub.kind == "mask":
        named = {
            k: sub.operator(v)
            for k, v in (("alpha", alpha), ("gamma", gamma), ("mu", mu), ("kappa", kappa))
        }
    else:
        named = sub.kron_operators(lin)
    # one block per parameter, or one block holding every piece
    ops = {
        k: [piece for _, piece in pieces] if per_layer else [pieces] for k, pieces in named.items()
    }
    return AdamWStep(
        G=G,
        n=n,
        g=sub.project({k: v.unsqueeze(0) for k, v in g.items()})[0],
        ops=ops,
        rho=lin.decay,
        beta1=lin.b1,
        beta2=lin.b2,
        c=lin.c,
        s=lin.s,
        F=F,
    )


def _factor_grads(task, theta: Tensors, x, y, curvature: str, seed: int) -> Tensors:
    """Curvature factor rows f with H ≈ Σ f fᵀ / |B|: Gauss-Newton (C rows per point: the
    logits' Jacobian times the square root of diag p − p pᵀ) or Monte-Carlo Fisher (one
    gradient per point with a label drawn from the model)."""
    model = task.model
    if curvature == "mc":
        with torch.no_grad():
            probs = torch.softmax(task.logits(theta, x).double(), dim=-1)
        gen = torch.Generator().manual_seed(seed)
        labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]).cpu(), 1, generator=gen)
        labels = labels.view(probs.shape[:-1]).to(y.device)
        return per_sample_grads(task.per_sample_loss, theta, x, labels)
    # GN: for softmax cross-entropy, diag p − p pᵀ = S Sᵀ with S = diag(√p) − p √pᵀ (C columns)
    with torch.no_grad():
        probs = torch.softmax(task.logits(theta, x), dim=-1)  # [B, C]
    sq = probs.sqrt()
    S = torch.diag_embed(sq) - probs.unsqueeze(-1) * sq.unsqueeze(-2)  # [B, C, C]

    def logit_row(p, xi, si):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return logits_of(out)[0] @ si  # [C]: Jᵀ columns via S

    def rows_of(p, xi, si):
        return torch.func.jacrev(logit_row)(p, xi, si)  # {name: [C, *shape]}

    per = vmap(rows_of, in_dims=(None, 0, 0))(theta, x, S)  # {name: [B, C, *shape]}
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in per.items()}


def adamw_scores(run: TrainedRun, E: np.ndarray, sub: Subspace, queries: Tensors) -> np.ndarray:
    """Scores [N_occ, Q] of stored embeddings for query gradients {name: [Q, ...]} at θ_T."""
    U = sub.project(queries).double().cpu().numpy()  # [Q, p̃]
    return E @ U.T
