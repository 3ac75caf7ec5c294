"""Fitted projection stage: the K-FAC eigenbasis (``projection.kind=kfac``), the principal
components (``pca``) or the gradient-weighted eigenbasis (``gradcov``) of a recorded run's
gradient factors.

Reads a finished training run. Replays steps ``[0, fit_steps)`` (all steps when 0) and,
before each step, takes every captured layer's per-sample hook factors at ``θ_t`` (inputs
``a`` with the bias's 1 appended, output gradients ``b`` of the unweighted per-sample loss,
true labels) to average the two second moments per layer, over the occurrences of those steps:

    A = E[Σ_s a_s a_sᵀ]  [d_in + 1, d_in + 1],   B = E[Σ_s b_s b_sᵀ]  [d_out, d_out]

(the K-FAC factors, which LoGra's "PCA initialisation" uses; for an ``nn.Embedding`` A is the
diagonal of token counts). ``pca`` centres them first (A − S μ_a μ_aᵀ with μ_a the per-token
mean and S the tokens per occurrence; textbook PCA, which drops the mean direction the
gradient's bias column and the mean image live in). ``gradcov`` weights them by the other
factor: the two partial traces of the per-sample gradient's second moment, E[GᵀG] and E[GGᵀ]
with G = Σ_s b_s a_sᵀ (for one token E[‖b‖² a aᵀ] and E[‖a‖² b bᵀ]); with the other side kept
whole its top eigenvectors keep the most gradient energy E‖P g‖² of any k directions. pca and
gradcov are not defined for embeddings. The rows of
the layer's ``P_in`` / ``P_out`` are the top ``k_in`` / ``k_out`` eigenvectors (each capped at
the factor's size; descending eigenvalue, the largest-magnitude entry made positive), the
last ``round(random_fraction · k)`` of them replaced by Gaussian directions from
``projection.seed`` orthonormalised against the kept ones. Writes
``<out_root>/<name>/projection-<fingerprint>/`` (:class:`artifacts.RunDir`, verified before reuse):

* ``basis.safetensors`` — ``<layer>.out`` [k_out, d_out], ``<layer>.in`` [k_in, d_in + 1]
  (float64, orthonormal rows) and ``<layer>.out_eigenvalues`` / ``<layer>.in_eigenvalues``
  (every eigenvalue, descending); its blake2b checksum enters the projector's description,
  which every embedding saves, so a query projected with another basis is refused;
* ``basis.json`` — steps and samples averaged, per layer the share of each moment's trace
  that the kept directions carry, the fitting time.

The fingerprint covers the recorded trajectory, the captured layers and the fitted
projection's settings; the basis is deterministic given them (same device and library).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dve_repro import artifacts, torch_state, ui
from dve_repro.config import FITTED_PROJECTIONS, Config, fingerprint, stage_payload, to_dict
from dve_repro.errors import DveError
from dve_repro.grads import Block
from dve_repro.projection import FittedBasis, Projector, _gaussian, _seed
from dve_repro.replay import TrainedRun, replay

BASIS = "basis.safetensors"
_MOMENTS: dict = {}  # the last run's factor moments (decompose-projection fits many sizes from one)
# Largest factor whose dense [d, d] second moment is fitted (512 MB in float64); an
# embedding's input side (token ids) is diagonal and has no limit.
MAX_MOMENT_DIM = 8192


def make_projector(cfg: Config, run: TrainedRun, blocks: list[Block]) -> Projector:
    """The configured projector; a fitted kind loads (or first fits) its basis for ``run``."""
    if cfg.projection.kind not in FITTED_PROJECTIONS:
        return Projector(cfg.projection, blocks)
    return Projector(cfg.projection, blocks, load_or_fit(cfg, run, blocks))


def basis_payload(cfg: Config, blocks: list[Block]) -> dict:
    p = cfg.projection
    return {"trajectory": stage_payload(cfg, "trajectory"),
            "layers": [[b.name, list(b.shape)] for b in blocks],
            "projection": {"kind": p.kind, "k_in": p.k_in, "k_out": p.k_out, "fit_steps": p.fit_steps,
                           "random_fraction": p.random_fraction, "seed": p.seed}}


def basis_dir(cfg: Config, blocks: list[Block]) -> Path:
    return artifacts.stage_dir(cfg.runtime.out_root, cfg.name, "projection",
                               fingerprint(basis_payload(cfg, blocks)))


def load_or_fit(cfg: Config, run: TrainedRun, blocks: list[Block]) -> FittedBasis:
    """The stored basis of this run and projection, fitted first when missing or damaged."""
    rd = artifacts.RunDir(basis_dir(cfg, blocks), basis_payload(cfg, blocks))
    rd.check()
    with rd.locked():
        if rd.reusable():
            ui.log(f"using the fitted projection basis {rd.final}")
        else:
            rd.prepare(to_dict(cfg), run.device)
            t0 = time.perf_counter()
            tensors, summary = fit_basis(cfg, run, blocks)
            summary["fit_s"] = time.perf_counter() - t0
            artifacts.save_tensors(rd.file(BASIS), tensors)
            artifacts.write_json(rd.file("basis.json"), summary)
            rd.mark_done({"steps": summary["steps"], "samples": summary["samples"]})
            ui.log(f"fitted the {cfg.projection.kind} projection basis from {summary['steps']} steps "
                   f"({summary['fit_s']:.1f} s) -> {rd.final}")
        path = rd.final / BASIS
        return FittedBasis.from_tensors(artifacts.load_tensors(path), artifacts.hash_file(path))


def fit_basis(cfg: Config, run: TrainedRun, blocks: list[Block]) -> tuple[dict[str, torch.Tensor], dict]:
    """The basis tensors (module docstring) and a summary of the fit."""
    p = cfg.projection
    steps = p.fit_steps or run.T
    if steps > run.T:
        raise DveError(f"projection.fit_steps={p.fit_steps} is larger than the run's {run.T} steps")
    for b in blocks:  # a dense second moment of a vocabulary-sized factor would not fit
        sides = [("output", b.shape[0])] + ([("input", b.shape[1])] if b.kind == "linear" else [])
        for side, d in sides:
            if d > MAX_MOMENT_DIM:
                raise DveError(f"projection.kind={p.kind}: the {side} factor of layer {b.name} has {d:,} dimensions, "
                               f"more than the {MAX_MOMENT_DIM:,} whose second moment is fitted; capture fewer layers "
                               "(e.g. model.capture_layers=all) or use projection.kind=kronecker")
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, dict] = {}
    if p.kind != "kfac" and any(b.kind == "embedding" for b in blocks):
        emb = next(b.name for b in blocks if b.kind == "embedding")
        raise DveError(f"projection.kind={p.kind}: the token factor of the embedding {emb} would need a dense, "
                       "vocabulary-sized moment; use projection.kind=kfac")
    key = (str(run.path), tuple(b.name for b in blocks), steps, p.kind == "gradcov")
    if key not in _MOMENTS:  # one replay serves every size and kind fitted in this process
        _MOMENTS.clear()
        _MOMENTS[key] = factor_moments(run, blocks, steps, gradient_weighted=p.kind == "gradcov")
    moments, n = _MOMENTS[key]
    for i, b in enumerate(blocks):
        A, B = moments[b.name].matrices(p.kind)
        (d_out, d_in), k_out, k_in = b.shape, min(p.k_out, b.shape[0]), min(p.k_in, b.shape[1])
        p_out, ev_out = top_directions(B, k_out, round(p.random_fraction * k_out), _seed(p.seed, i, 11))
        p_in, ev_in = top_directions(A, k_in, round(p.random_fraction * k_in), _seed(p.seed, i, 12))
        tensors.update({f"{b.name}.out": p_out, f"{b.name}.in": p_in,
                        f"{b.name}.out_eigenvalues": ev_out, f"{b.name}.in_eigenvalues": ev_in})
        kept[b.name] = {"k_out": k_out, "d_out": d_out, "k_in": k_in, "d_in": d_in,
                        "out_trace_kept": captured_share(B, p_out), "in_trace_kept": captured_share(A, p_in)}
    return tensors, {"steps": steps, "samples": n, "layers": kept}


def factor_moments(run: TrainedRun, blocks: list[Block], steps: int,
                   gradient_weighted: bool = False) -> tuple[dict[str, FactorMoments], int]:
    """{layer: :class:`FactorMoments`} averaged over the occurrences of steps [0, steps)
    (float64), and the number of occurrences; ``gradient_weighted`` adds E[GᵀG] and E[GGᵀ]."""
    from dve_repro.capture import hook_factors

    sums: dict[str, list] = {}
    count = [0]
    task = run.task

    def before(t: int, params: dict) -> None:
        x, y = task.batch(run.traj.batches[t])
        for name, (a, b) in hook_factors(task, blocks, params, x, y).items():
            b = b.double()
            B = torch.einsum("nso,nsp->op", b, b)
            if a.is_floating_point():
                a = a.double()
                A, sa = torch.einsum("nsi,nsj->ij", a, a), a.sum((0, 1))
            else:  # token ids: the one-hot second moment is diagonal, the counts
                A = torch.bincount(a.reshape(-1), minlength=_block(blocks, name).shape[1]).double()
                sa = A
            new = [A, B, sa, b.sum((0, 1)), b.shape[0] * b.shape[1]]
            if gradient_weighted:  # G_i = Σ_s b_s a_sᵀ: GᵀG = Σ_st (b_s·b_t) a_s a_tᵀ, GGᵀ = Σ_st (a_s·a_t) b_s b_tᵀ
                new += [torch.einsum("nsi,nst,ntj->ij", a, torch.einsum("nso,nto->nst", b, b), a),
                        torch.einsum("nso,nst,ntp->op", b, torch.einsum("nsi,nti->nst", a, a), b)]
            sums[name] = new if name not in sums else [u + v for u, v in zip(sums[name], new, strict=True)]
        count[0] += int(x.shape[0])

    with ui.bar("fit projection (replay)", total=steps, unit="step") as bar:
        replay(run, start=0, stop=steps, before_step=lambda t, params: (before(t, params), bar.update(1)))
    n = count[0]
    return {k: FactorMoments(A.cpu() / n, B.cpu() / n, sa.cpu() / rows, sb.cpu() / rows, rows / n,
                             *(m.cpu() / n for m in rest))
            for k, (A, B, sa, sb, rows, *rest) in sums.items()}, n


@dataclass
class FactorMoments:
    """One layer's factor statistics per occurrence: second moments A = E[Σ_s a_s a_sᵀ] (a vector
    of token frequencies for an embedding) and B = E[Σ_s b_s b_sᵀ], the per-token means of a and
    b, and the tokens per occurrence S (1 for vectors)."""

    A: torch.Tensor
    B: torch.Tensor
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    tokens: float
    GtG: torch.Tensor | None = None  # E[G_iᵀ G_i] [d_in, d_in] (gradient_weighted only)
    GGt: torch.Tensor | None = None  # E[G_i G_iᵀ] [d_out, d_out]

    def matrices(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (input, output) matrices whose eigenvectors ``kind`` keeps: kfac (A, B); pca the
        covariances A − S μ_a μ_aᵀ, B − S μ_b μ_bᵀ; gradcov (E[GᵀG], E[GGᵀ])."""
        if kind == "kfac":
            return self.A, self.B
        if self.A.dim() == 1:
            raise DveError(f"projection.kind={kind} needs a dense moment of an embedding's token factor; "
                           "use projection.kind=kfac")
        if kind == "gradcov":
            return self.GtG, self.GGt
        return (self.A - self.tokens * torch.outer(self.mean_a, self.mean_a),
                self.B - self.tokens * torch.outer(self.mean_b, self.mean_b))


def _block(blocks: list[Block], name: str) -> Block:
    return next(b for b in blocks if b.name == name)


def top_directions(moment: torch.Tensor, k: int, n_random: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [k, d] with orthonormal rows, every eigenvalue descending [d]).

    The first ``k − n_random`` rows are the top eigenvectors of the symmetric ``moment``
    [d, d] (or of ``diag(moment)`` for a vector), each signed so that its largest-magnitude
    entry is positive; the last ``n_random`` are Gaussian rows from ``seed`` made orthonormal
    to them and to each other."""
    if moment.dim() == 1:  # diagonal: the eigenvectors are coordinate axes (ties by index)
        vals, order = torch.sort(moment, descending=True, stable=True)
        vecs = torch.zeros(k - n_random, moment.shape[0], dtype=torch.float64)
        vecs[torch.arange(k - n_random), order[: k - n_random]] = 1.0
    else:
        with torch_state.threads(1):  # the basis must not depend on runtime.threads (it is checksummed)
            vals, vecs = torch.linalg.eigh(moment.double())
        vals, vecs = vals.flip(0), vecs.flip(1).T[: k - n_random]
        pivot = vecs.abs().argmax(dim=1, keepdim=True)
        vecs = vecs * torch.sign(vecs.gather(1, pivot))
    if n_random:
        vecs = torch.cat([vecs, _orthonormal_complement(vecs, n_random, seed)])
    return vecs.contiguous(), vals.contiguous()


def _orthonormal_complement(U: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n Gaussian rows made orthonormal, and orthogonal to U's orthonormal rows: [n, d]."""
    R = _gaussian(n, U.shape[1], seed, torch.float64, "cpu")
    for _ in range(2):  # project out twice: one pass leaves rounding error of the order of ‖U Rᵀ‖ ε
        R = R - (R @ U.T) @ U
    Q, r = torch.linalg.qr(R.T)
    return (Q * torch.sign(torch.diagonal(r))).T  # QR's sign freedom fixed: diag(r) > 0


def captured_share(moment: torch.Tensor, P: torch.Tensor) -> float:
    """tr(P M Pᵀ) / tr(M): the share of the factor's second moment the rows of P keep."""
    if moment.dim() == 1:
        return float((P**2 @ moment).sum() / moment.sum())
    return float(torch.einsum("ki,ij,kj->", P, moment, P) / torch.trace(moment))
