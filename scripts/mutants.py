"""Mutation gauntlet: plant one plausible one-line bug at a time and check the fast tests catch it.

Each catalogue entry names a module under ``src/dve_repro/``, an exact snippet of its source
(it must occur exactly once) and a replacement. For every mutant the repository's ``src``,
``tests``, ``scripts`` and ``pyproject.toml`` are copied to a temporary folder, the snippet is
replaced there, and the default tier (``-m "not slow and not gpu"``) runs with ``-x`` against
the copy (``PYTHONPATH`` and ``DVE_CONFIG_DIR`` point at it; the script checks that the copy's
package is the one imported, not the editable install). A mutant is *caught* when a test
fails; a mutant that runs past ``--timeout`` counts as caught only with ``--timeout-caught``.

    python scripts/mutants.py                   # the whole catalogue, 2 at a time
    python scripts/mutants.py --only adamw-bias-correction-step --tests tests/unit/test_oracles_optim.py
    python scripts/mutants.py --check           # only check that every snippet occurs once
    python scripts/mutants.py --list

First the unmutated tree runs the same tests (they must pass, else every mutant would look
caught). Prints a table (mutant, module, caught by which test / SURVIVED) and exits 1 when
any mutant survives, 2 when the catalogue no longer matches the source, 3 when the
unmutated tests fail. ``--rev HEAD`` mutates the last commit instead of the working tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "scripts", "pyproject.toml")
FAST_TIER = "not slow and not gpu"
# The whole fast tier as a list of files, the quick float64 oracles first: most mutants fail
# there within seconds and -x stops (pytest keeps the order of file arguments).
FIRST = (
    "test_oracles_optim",
    "test_embedding",
    "test_oracles_lm",
    "test_bootstrap",
    "test_oracles_unroll",
    "test_oracles_adamw_unroll",
    "test_oracles_baselines",
    "test_oracles_tsloo",
    "test_oracles_embed",
    "test_projection",
    "test_grads",
    "test_capture",
    "test_replay",
    "test_tsloo",
    "test_detect",
)


def default_tests(root: Path = ROOT) -> list[str]:
    files = sorted((root / "tests" / "unit").glob("test_*.py")) + sorted(
        (root / "tests" / "smoke").glob("test_*.py")
    )
    rank = {name: i for i, name in enumerate(FIRST)}
    files.sort(key=lambda f: (rank.get(f.stem, len(FIRST)), f.parent.name != "unit", f.name))
    return [str(f.relative_to(root)) for f in files]


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # path under src/dve_repro/
    original: str  # exact snippet; must occur exactly once in the module
    replacement: str
    what: str


M = Mutant
CATALOGUE: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- optim
    M(
        "sgd-weight-decay-sign",
        "optim.py",
        "g = g + cfg.weight_decay * p",
        "g = g - cfg.weight_decay * p",
        "SGD weight decay with the wrong sign",
    ),
    M(
        "sgd-momentum-dampening",
        "optim.py",
        'g = cfg.momentum * state[f"buf.{k}"] + g',
        'g = cfg.momentum * state[f"buf.{k}"] + (1 - cfg.momentum) * g',
        "momentum buffer with dampening 1 − μ",
    ),
    M(
        "adamw-lin-clip-derivative",
        "optim.py",
        "self.s = cfg.grad_clip / ((norm + 1e-6) ** 2 * norm)",
        "self.s = 0.0 * cfg.grad_clip / ((norm + 1e-6) ** 2 * norm)",
        "linearised AdamW: clipping factor's dependence on ‖g‖ dropped",
    ),
    M(
        "adamw-lin-second-moment-factor",
        "optim.py",
        "vk = self.b2 * dv[k] + 2 * (1 - self.b2) * self.gt[k] * dgt[k]",
        "vk = self.b2 * dv[k] + (1 - self.b2) * self.gt[k] * dgt[k]",
        "linearised AdamW: δv' without the factor 2 of g∘δg",
    ),
    M(
        "adamw-unroll-sign",
        "unroll.py",
        "(-u / n).T.cpu().numpy()",
        "(u / n).T.cpu().numpy()",
        "AdamW unrolling scores on the wrong sign",
    ),
    M(
        "adamw-unroll-curvature-sign",
        "unroll.py",
        "lt = {k: lt[k] + cv[k] for k in lt}",
        "lt = {k: lt[k] - cv[k] for k in lt}",
        "AdamW unrolling: curvature path δg = −C δθ",
    ),
    M(
        "adamw-unroll-mc-seed",
        "unroll.py",
        "lg, n, curvature, mc_samples, mc_step_seed(mc_seed, t))",
        "lg, n, curvature, mc_samples, mc_step_seed(mc_seed, t + 1))",
        "AdamW unrolling: Monte-Carlo labels drawn with the next step's seed",
    ),
    M(
        "adamw-embedding-beta-swap",
        "embedding_adamw.py",
        "Am[b].mul_(st.beta1)",
        "Am[b].mul_(st.beta2)",
        "AdamW recursion: first moment decays with β₂",
    ),
    M(
        "adamw-kron-sandwich-transpose",
        "embed_adamw.py",
        "return torch.linalg.solve(P @ P.T, left.T).T",
        "return torch.linalg.solve(P @ P.T, left.T)",
        "Kronecker subspace: P diag(d) P⁺ transposed",
    ),
    M(
        "adamw-bias-correction-step",
        "optim.py",
        "t = step + 1\n    bc1 = 1",
        "t = step + 2\n    bc1 = 1",
        "AdamW bias correction one step late",
    ),
    M(
        "adamw-no-second-bias-correction",
        "optim.py",
        "denom = torch.sqrt(v) / math.sqrt(bc2) + cfg.eps",
        "denom = torch.sqrt(v) + cfg.eps",
        "AdamW without the second-moment bias correction",
    ),
    M(
        "adamw-coupled-decay",
        "optim.py",
        "p = p * (1 - lr * cfg.weight_decay)",
        "p = p * (1 - cfg.weight_decay)",
        "AdamW weight decay not scaled by the learning rate",
    ),
    M(
        "adamw-second-moment-abs",
        "optim.py",
        '(1 - b2) * g * g\n        new_s',
        '(1 - b2) * g.abs()\n        new_s',
        "AdamW second moment of |g| instead of g²",
    ),
    M(
        "clip-without-cap",
        "optim.py",
        "coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)",
        "coef = max_norm / (norm + 1e-6)",
        "clipping also scales small gradients up",
    ),
    M(
        "lr-warmup-off-by-one",
        "optim.py",
        "f = (t + 1) / cfg.warmup_steps",
        "f = t / cfg.warmup_steps",
        "warm-up starts from lr 0 and peaks one step late",
    ),
    M(
        "lr-decay-span",
        "optim.py",
        "span = max(1, total_steps - cfg.warmup_steps)",
        "span = max(1, total_steps)",
        "decay spread over all T steps instead of the T − w after warm-up",
    ),
    M(
        "adamw-lin-no-bias-correction",
        "optim.py",
        "self.a = lr / bc1",
        "self.a = lr",
        "linearised AdamW: step size without the first-moment bias correction",
    ),
    M(
        "adamw-lin-adjoint-no-decay",
        "optim.py",
        "in_t[k] = self.decay * lt[k]",
        "in_t[k] = lt[k]",
        "linearised AdamW adjoint: decoupled weight decay (1 − ηλ) left out",
    ),
    # ---------------------------------------------------------------- embedding (Algorithms 1, 2)
    M(
        "alg1-M-transposed",
        "embedding.py",
        "e = torch.addmm(g, g, M.T, alpha=-1.0).mul_(ws[t])",
        "e = torch.addmm(g, g, M, alpha=-1.0).mul_(ws[t])",
        "Algorithm 1 uses M instead of Mᵀ",
    ),
    M(
        "alg1-update-transposed",
        "embedding.py",
        "M.addmm_(e.T, g)",
        "M.addmm_(g.T, e)",
        "Algorithm 1 accumulates Gᵀ E instead of Eᵀ G",
    ),
    M(
        "matrix-free-sign",
        "embedding.py",
        "V[s] -= ws[t] * (f[:, s].T @ (f[:, s] @ V[s]))",
        "V[s] += ws[t] * (f[:, s].T @ (f[:, s] @ V[s]))",
        "matrix-free propagation with the wrong sign",
    ),
    M(
        "alg2-suffix-order",
        "embedding.py",
        "[Sb @ Q for Sb, Q in zip(S, Qs[k], strict=True)]",
        "[Q @ Sb for Sb, Q in zip(S, Qs[k], strict=True)]",
        "Algorithm 2 suffix product in the wrong order",
    ),
    M(
        "views-first-occurrence",
        "embedding.py",
        "order = np.lexsort((np.arange(n), st, inv))",
        "order = np.lexsort((np.arange(n), -st, inv))",
        "single-epoch view takes the first occurrence",
    ),
    # ---------------------------------------------------------------- embed stage
    M(
        "embed-weight-denominator",
        "embed_stage.py",
        "w = run.traj.lrs / run.traj.sizes()",
        "w = run.traj.lrs / (run.traj.sizes() - 1)",
        "step weight η_t/(|B_t| − 1)",
    ),
    M(
        "embed-scores-wrong-checkpoint",
        "embed_stage.py",
        "final = run.final_params()\n    E = artifacts.open_npy",
        "final = run.load_params(run.checkpoints[-2])[0]\n    E = artifacts.open_npy",
        "queries taken at the last checkpoint before θ_T",
    ),
    M(
        "embed-query-sum",
        "embed_stage.py",
        "q_mean = Q.mean(0)",
        "q_mean = Q.sum(0)",
        "mean validation loss's gradient summed instead of averaged",
    ),
    # ---------------------------------------------------------------- unroll
    M(
        "unroll-weight-denominator",
        "unroll.py",
        "w = float(traj.lrs[t]) / n",
        "w = float(traj.lrs[t]) / (n - 1)",
        "unrolled step weight η_t/(|B_t| − 1)",
    ),
    M(
        "unroll-hessian-sum",
        "unroll.py",
        "return losses_of(p).mean()",
        "return losses_of(p).sum()",
        "exact-Hessian curvature of the summed batch loss",
    ),
    M(
        "unroll-ef-unscaled",
        "unroll.py",
        "cv = vmap(lambda uq: pull(uq / n)[0])(u)",
        "cv = vmap(lambda uq: pull(uq)[0])(u)",
        "empirical Fisher without 1/|B|",
    ),
    M(
        "unroll-gn-no-correction",
        "unroll.py",
        "h = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)",
        "h = probs * jv",
        "Gauss-Newton without the −p pᵀ term",
    ),
    M(
        "unroll-mc-samples",
        "unroll.py",
        "pull(uq / (n * mc_samples))[0]",
        "pull(uq / n)[0]",
        "Monte-Carlo Fisher not averaged over its samples",
    ),
    M(
        "unroll-propagate-sign",
        "unroll.py",
        "new_v[k] = vk - lr * step if",
        "new_v[k] = vk + lr * step if",
        "query propagated with I + ηC",
    ),
    M(
        "unroll-no-weight-decay",
        "unroll.py",
        "(wd * vk if wd else 0)",
        "0",
        "weight decay left out of the propagator",
    ),
    M(
        "unroll-wrong-theta",
        "unroll.py",
        "theta = thetas[t - a]",
        "theta = thetas[max(t - a - 1, 0)]",
        "curvature and gradients taken at θ_{t−1}",
    ),
    M(
        "query-mean-summed",
        "unroll.py",
        "mean = grad(lambda p: task.per_sample_loss(p, x, y).mean())(params)",
        "mean = grad(lambda p: task.per_sample_loss(p, x, y).sum())(params)",
        "query 0 is the summed, not the mean, validation loss",
    ),
    # ---------------------------------------------------------------- baselines
    M(
        "if-damping-sign",
        "baselines.py",
        "return {k: hv[k] + damping * V[k] for k in V}",
        "return {k: hv[k] - damping * V[k] for k in V}",
        "influence function with H − δI",
    ),
    M(
        "if-no-1-over-n",
        "baselines.py",
        'values = _dot_rows(run, params, x, label="influence (dot products)") / n',
        'values = _dot_rows(run, params, x, label="influence (dot products)")',
        "influence function without the 1/n of one point's removal",
    ),
    M(
        "chunk-uncapped",
        "baselines.py",
        "return max(1, min(default, CHUNK_BYTES // need))",
        "return default",
        "the memory cap on a chunk of training points ignored (an LM's logits unbounded)",
    ),
    M(
        "tracin-final-checkpoint",
        "baselines.py",
        "params = run.load_params(c)[0]",
        "params = run.load_params(run.T)[0]",
        "TracIn takes every gradient at θ_T",
    ),
    M(
        "grad-dot-initial",
        "baselines.py",
        'return _dot_rows(run, run.final_params(), queries, label="grad-dot")',
        'return _dot_rows(run, run.load_params(0)[0], queries, label="grad-dot")',
        "gradient dot product at θ_0",
    ),
    M(
        "tracin-first-lr",
        "baselines.py",
        "term = float(run.traj.lrs[c])",
        "term = float(run.traj.lrs[0])",
        "TracIn weighs every checkpoint by the first step's learning rate",
    ),
    M(
        "if-cg-solution-sign",
        "baselines.py",
        "x = {k: x[k] + shape(alpha, x[k]) * p[k] for k in x}",
        "x = {k: x[k] - shape(alpha, x[k]) * p[k] for k in x}",
        "CG moves the solution against its search direction (the residual still converges)",
    ),
    # ---------------------------------------------------------------- tsloo (ground truth)
    M(
        "tsloo-sign",
        "tsloo.py",
        "d = losses[1:] - losses[:1]",
        "d = losses[:1] - losses[1:]",
        "batched TSLOO with the sign flipped (with − without)",
    ),
    M(
        "tsloo-renormalize-denominator",
        "tsloo.py",
        "W[c][W[c] > 0] = 1.0 / (n - len(pos))",
        "W[c][W[c] > 0] = 1.0 / n",
        "renormalize convention keeps |B_t|",
    ),
    M(
        "tsloo-single-first-occurrence",
        "tsloo.py",
        'chosen = [steps[-1]] if setting == "single" else steps',
        'chosen = [steps[0]] if setting == "single" else steps',
        "single-epoch removal from the first occurrence",
    ),
    M(
        "tsloo-points-with-replacement",
        "tsloo.py",
        "rng.choice(used, size=n, replace=False)",
        "rng.choice(used, size=n, replace=True)",
        "removed points sampled with replacement",
    ),
    M(
        "tsloo-naive-ignores-convention",
        "tsloo.py",
        'renormalize=job.convention == "renormalize"',
        "renormalize=False",
        "naive reference always keeps the denominator",
    ),
    # ---------------------------------------------------------------- replay / trajectory / train
    M(
        "replay-removal-off-by-one",
        "replay.py",
        "w = traj.weights(t, removals.get(t, ()),",
        "w = traj.weights(t, removals.get(t + 1, ()),",
        "point removed from the step after the one asked",
    ),
    M(
        "weights-conventions-swapped",
        "trajectory.py",
        "denom = kept if renormalize else n",
        "denom = n if renormalize else kept",
        "keep and renormalize swapped",
    ),
    M(
        "train-weight-denominator",
        "train.py",
        "1.0 / len(indices), dtype=task.weight_dtype",
        "1.0 / (len(indices) + 1), dtype=task.weight_dtype",
        "training loss averaged over |B_t| + 1",
    ),
    # ---------------------------------------------------------------- capture / grads / projection
    M(
        "kfac-smallest-eigenvectors",
        "projection_fit.py",
        "vecs.flip(1).T[: k - n_random]",
        "vecs.T[: k - n_random]",
        "fitted projection keeps the smallest eigenvectors of the factor moments",
    ),
    M(
        "kfac-random-rows-not-orthogonal",
        "projection_fit.py",
        "R = R - (R @ U.T) @ U",
        "R = R",
        "random rows of a mixed fitted projection not orthogonalised against the eigenvectors",
    ),
    M(
        "gn-rows-no-sqrt",
        "capture.py",
        "probs[:, c].sqrt()) for c in range(probs.shape[-1])]",
        "probs[:, c]) for c in range(probs.shape[-1])]",
        "Gauss-Newton factor rows scaled by p_c instead of √p_c",
    ),
    M(
        "mc-rows-scale",
        "capture.py",
        "1.0 / math.sqrt(k), dtype=probs.dtype",
        "1.0 / k, dtype=probs.dtype",
        "Monte-Carlo rows scaled by 1/k instead of 1/√k",
    ),
    M(
        "hooks-keep-loss-weight",
        "grads.py",
        "scale = 1.0 / weights",
        "scale = torch.ones_like(weights)",
        "hook factors keep the 1/|B| loss weight",
    ),
    M(
        "kronecker-transposed",
        "projection.py",
        'parts.append(torch.einsum("bso,bsi->boi", b, a).flatten(1))',
        'parts.append(torch.einsum("bso,bsi->bio", b, a).flatten(1))',
        "Kronecker features laid out transposed",
    ),
    M(
        "fused-capture-keeps-loss-weight",
        "projection.py",
        "pb = pb * scale.view(n, 1, 1)",
        "pb = pb",
        "fused training-step rows keep the 1/|B| loss weight",
    ),
    M(
        "fused-capture-drops-bias-column",
        "projection.py",
        "torch.addmm(bias, x.reshape(-1, x.shape[-1]), in_t)",
        "torch.mm(x.reshape(-1, x.shape[-1]), in_t)",
        "fused training-step rows leave out the bias's column of P_in",
    ),
    M(
        "gaussian-scale",
        "projection.py",
        "/ math.sqrt(rows)",
        "/ math.sqrt(cols)",
        "projection entries N(0, 1/d) instead of N(0, 1/k)",
    ),
    # ---------------------------------------------------------------- task / LM losses
    M(
        "lm-loss-denominator",
        "lm.py",
        "sum(dim=1) / (y.shape[1] - 1)",
        "sum(dim=1) / y.shape[1]",
        "sequence loss averaged over L instead of the L − 1 predicted tokens",
    ),
    M(
        "lm-loss-no-shift",
        "lm.py",
        "tgt = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], dim=1)",
        "tgt = torch.cat([y[:, :-1], torch.full_like(y[:, :1], -100)], dim=1)",
        "LM targets not shifted (predicts the current token)",
    ),
    M(
        "classify-label-smoothing",
        "tasks.py",
        'F.cross_entropy(logits, y, reduction="none")',
        'F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)',
        "classification loss with smoothing",
    ),
    # ---------------------------------------------------------------- detect metrics and bootstrap
    M(
        "auroc-direction",
        "detect.py",
        "ranks = rankdata(-values)",
        "ranks = rankdata(values)",
        "AUROC ranks the wrong end",
    ),
    M(
        "ap-ties-split",
        "detect.py",
        "last = np.append(np.flatnonzero(np.diff(v) != 0), len(v) - 1)",
        "last = np.arange(len(v))",
        "average precision steps through tied values one at a time",
    ),
    # ---------------------------------------------------------------- text (Pile shards)
    M(
        "zstd-truncation-unchecked",
        "text.py",
        'raise EOFError("the last zstd frame is truncated")',
        "pass",
        "a zstd shard cut off inside its last frame is read as if it ended there",
    ),
    M(
        "zstd-first-frame-only",
        "text.py",
        "chunk, dobj, fed = dobj.unused_data, dctx.decompressobj(), False",
        'chunk, dobj, fed = b"", dctx.decompressobj(), False',
        "multi-frame zstd shards: the bytes after the first frame dropped",
    ),
    M(
        "detect-bootstrap-without-replacement",
        "stats.py",
        "rng.choice(pos, len(pos)), rng.choice(neg, len(neg))",
        "rng.choice(pos, len(pos), replace=False), rng.choice(neg, len(neg), replace=False)",
        "stratified bootstrap resamples without replacement",
    ),
    M(
        "compare-bootstrap-without-replacement",
        "stats.py",
        "np.random.default_rng(seed).integers(0, n, (n_boot, n))",
        "np.stack([np.random.default_rng(seed).permutation(n) for _ in range(n_boot)])",
        "correlation bootstrap resamples without replacement",
    ),
    M(
        "compare-bootstrap-upper-percentile",
        "stats.py",
        "float(np.percentile(stats, 97.5))",
        "float(np.percentile(stats, 75))",
        "upper interval bound at the 75th percentile (every bootstrap interval)",
    ),
)


class DriftError(RuntimeError):
    pass


def check_catalogue(root: Path = ROOT) -> list[str]:
    """Messages for every entry whose snippet does not occur exactly once (empty = all good)."""
    problems = []
    names = [m.name for m in CATALOGUE]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"duplicate mutant names: {dup}")
    for m in CATALOGUE:
        path = root / "src" / "dve_repro" / m.module
        if not path.is_file():
            problems.append(f"{m.name}: module {m.module} not found")
            continue
        n = path.read_text().count(m.original)
        if n != 1:
            problems.append(
                f"{m.name}: snippet occurs {n} times in src/dve_repro/{m.module} (need exactly 1): "
                f"{m.original!r} — the source changed; update the catalogue entry"
            )
    return problems


def make_base(dst: Path, rev: str | None) -> None:
    """The unmutated tree every mutant starts from: the working tree, or a git revision
    (``--rev HEAD``: immune to files being edited while the gauntlet runs)."""
    dst.mkdir(parents=True, exist_ok=True)
    if rev:
        archive = subprocess.run(
            ["git", "archive", rev, *COPIED], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)
        return
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


def _apply(copy: Path, m: Mutant) -> None:
    path = copy / "src" / "dve_repro" / m.module
    text = path.read_text()
    if text.count(m.original) != 1:
        raise DriftError(f"{m.name}: snippet no longer occurs exactly once in {m.module}")
    path.write_text(text.replace(m.original, m.replacement))


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(copy / "src"),
        DVE_CONFIG_DIR=str(copy / "src" / "dve_repro" / "configs"),
        MPLCONFIGDIR=str(copy / ".mpl"),
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def _check_import(copy: Path, python: str) -> None:
    out = subprocess.run(
        [python, "-c", "import dve_repro; print(dve_repro.__file__)"],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
        timeout=120,
    )
    where = Path(out.stdout.strip()).resolve()
    if copy.resolve() not in where.parents:
        raise RuntimeError(
            f"the mutated copy is not what gets imported (dve_repro from {where or out.stderr})"
        )


_FAIL = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_one(
    m: Mutant | None, base: Path, tests: list[str], timeout: float, python: str, keep: bool = False
) -> dict:
    """Copy ``base``, plant ``m`` (None: the unmutated baseline) and run the tests with -x."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"mutant-{m.name if m else 'baseline'}-"))
    try:
        shutil.copytree(base, tmp, dirs_exist_ok=True)
        if m is not None:
            _apply(tmp, m)
        _check_import(tmp, python)
        cmd = [
            python,
            "-m",
            "pytest",
            "-m",
            FAST_TIER,
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            *(tests or default_tests(tmp)),
        ]
        try:
            out = subprocess.run(
                cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {
                "mutant": m,
                "status": "timeout",
                "by": f"timeout after {timeout:.0f}s",
                "seconds": time.perf_counter() - t0,
            }
        hit = _FAIL.search(out.stdout)
        if out.returncode == 0:
            status, by = "survived", "SURVIVED"
        elif hit:
            status, by = "caught", hit.group(2)
        else:
            status, by = (
                "caught",
                f"pytest exit {out.returncode}: {(out.stdout + out.stderr).strip().splitlines()[-1:]}",
            )
        return {"mutant": m, "status": status, "by": by, "seconds": time.perf_counter() - t0}
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="run only this mutant (repeatable)")
    ap.add_argument(
        "--tests", action="append", default=[], help="test paths (default: the fast tier)"
    )
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at the same time")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    ap.add_argument(
        "--timeout-caught", action="store_true", help="a mutant that times out counts as caught"
    )
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument(
        "--check", action="store_true", help="only check that every snippet occurs once"
    )
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (debugging)")
    ap.add_argument(
        "--rev", default=None, help="mutate this git revision (e.g. HEAD), not the working tree"
    )
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the unmutated run (it must pass)"
    )
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mutants-base-"))
    try:
        make_base(base, args.rev)
        return _gauntlet(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _report(r: dict) -> None:
    name = r["mutant"].name if r["mutant"] else "(no mutant)"
    print(f"  {name:40s} {r['status']:8s} {r['seconds']:6.0f}s  {r['by']}", flush=True)


def _gauntlet(args, base: Path) -> int:
    problems = check_catalogue(base)
    if problems:
        print(
            "the mutant catalogue no longer matches the source:\n  " + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 2
    if args.list or args.check:
        if args.list:
            for m in CATALOGUE:
                print(f"{m.name:40s} {m.module:15s} {m.what}")
        print(f"{len(CATALOGUE)} mutants; every snippet occurs exactly once")
        return 0
    chosen = [m for m in CATALOGUE if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in CATALOGUE}
    if unknown:
        print(f"unknown mutants: {sorted(unknown)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.no_baseline:  # a test failing without any mutant would "catch" every one
        r = run_one(None, base, args.tests, args.timeout, args.python)
        _report(r)
        if r["status"] != "survived":
            print(
                "the tests fail (or time out) without any mutant; fix that first", file=sys.stderr
            )
            return 3
    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futs = [
            pool.submit(run_one, m, base, args.tests, args.timeout, args.python, args.keep)
            for m in chosen
        ]
        for f in futs:
            results.append(f.result())
            _report(results[-1])
    survived = [
        r
        for r in results
        if r["status"] == "survived" or (r["status"] == "timeout" and not args.timeout_caught)
    ]
    print("\n| mutant | module | change | caught by |\n|---|---|---|---|")
    for r in results:
        m = r["mutant"]
        print(f"| {m.name} | {m.module} | {m.what} | {r['by']} |")
    print(
        f"\n{len(results) - len(survived)}/{len(results)} mutants caught, {len(survived)} survived "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
