"""``dve bench adamw``: the AdamW-aware recursion against the paper's SGD recursion at equal
projection size (issue 11's cost target: within 3×).

Both recursions run on the same synthetic per-sample rows G [T·B, p̃] (one block, float64),
in interleaved rounds, median of the rounds: Algorithm 1 (``embedding.algorithm1``, the SGD
recursion), the AdamW recursion with diagonal operators (``mask`` subspace) and with
Kronecker-pair operators (``kron`` subspace; k_out = 32 rows × p̃/32 columns, two pairs for α).
Memory is the recursion's matrices (SGD: M, p̃²; AdamW: A_θ, A_m, A_v, 3p̃²); storage per
point is p̃ numbers for all three. Writes ``adamw.csv`` / ``adamw.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import artifacts, torch_state
from dve_repro.bench.harness import median, timed
from dve_repro.embedding import algorithm1
from dve_repro.embedding_adamw import AdamWStep, OpSum, algorithm1_adamw
from dve_repro.tables import markdown_table


def _steps(G: torch.Tensor, T: int, B: int, kind: str, gen: torch.Generator) -> list[AdamWStep]:
    p = G.shape[1]
    out = []
    for t in range(T):

        def diag():
            return 1e-3 * torch.rand(p, generator=gen, dtype=torch.float64)

        def pair():
            ko = 32
            ki = p // ko
            return (
                torch.rand(ko, ko, generator=gen, dtype=torch.float64),
                1e-3 * torch.rand(ki, ki, generator=gen, dtype=torch.float64),
            )

        if kind == "mask":
            ops = {k: [diag()] for k in ("alpha", "gamma", "mu", "kappa")}
        else:
            ops = {
                "alpha": [OpSum((pair(), pair()))],
                "gamma": [pair()],
                "mu": [pair()],
                "kappa": [pair()],
            }
        out.append(
            AdamWStep(
                G=G[t * B : (t + 1) * B],
                n=B,
                g=G[t * B],
                ops=ops,
                rho=1 - 1e-4,
                beta1=0.9,
                beta2=0.95,
                c=0.9,
                s=1e-3,
            )
        )
    return out


def _runs(G, offsets, w, steps, T: int, p: int) -> dict:
    """The three recursions on the same rows, as callables."""

    def adamw(kind: str):
        return lambda: algorithm1_adamw(
            [(t, steps[kind][t]) for t in range(T - 1, -1, -1)], p, emit=lambda t, e: None
        )

    return {
        "sgd": lambda: algorithm1(G, offsets, w),
        "adamw-mask": adamw("mask"),
        "adamw-kron": adamw("kron"),
    }


def bench_adamw(
    out_dir: Path, quick: bool = False, *, threads: int = 2, repeats: int | None = None
) -> pd.DataFrame:
    repeats = repeats or (1 if quick else 3)
    grid = [(1024, 64, 8)] if quick else [(1024, 64, 32), (2048, 64, 16), (4096, 64, 8)]
    rows = []
    with torch_state.threads(threads):
        for p, B, T in grid:
            gen = torch.Generator().manual_seed(p)
            G = torch.randn(T * B, p, generator=gen, dtype=torch.float64) / np.sqrt(p)
            offsets = np.arange(0, T * B + 1, B)
            w = np.full(T, 1e-3 / B)
            steps = {k: _steps(G, T, B, k, gen) for k in ("mask", "kron")}
            runs = _runs(G, offsets, w, steps, T, p)
            times: dict[str, list[float]] = {k: [] for k in runs}
            for r in range(repeats):  # interleaved rounds, order flipped each round
                order = list(runs) if r % 2 == 0 else list(reversed(runs))
                for name in order:
                    times[name].append(timed(runs[name])[0])
            sgd = median(times["sgd"])
            for name, ts in times.items():
                med = median(ts)
                rows.append(
                    {
                        "recursion": name,
                        "p_tilde": p,
                        "batch": B,
                        "steps": T,
                        "ms_per_step": 1e3 * med / T,
                        "points_per_s": T * B / med,
                        "ratio_to_sgd": med / sgd,
                        "matrix_MB": (1 if name == "sgd" else 3) * p * p * 8 / 1e6,
                        "bytes_per_point": p * 8,
                    }
                )
    df = pd.DataFrame(rows)
    header = (
        f"# AdamW-aware recursion vs the SGD recursion (Algorithm 1)\n\n"
        f"Made by `dve bench adamw{' --quick' if quick else ''}` ({threads} threads, {repeats} interleaved "
        f"rounds, median; load average at start {os.getloadavg()[0]:.1f}). Synthetic float64 rows, one block; "
        f"`ratio_to_sgd` is measured side by side in the same run.\n\n"
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_table(out_dir / "adamw.csv", df)
    artifacts.write_text(out_dir / "adamw.md", header + markdown_table(df, "{:.3g}"))
    return df
