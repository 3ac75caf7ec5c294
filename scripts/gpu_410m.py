"""E2 on a GPU: the Pythia-410M row of paper Table 1, beside the paper's numbers.

A thin driver over :func:`dve_repro.bench.lm_row` (all logic lives there). Composes
``experiment=pythia410m_pile1pct`` (AdamW, bf16 autocast, Kronecker 32 × 32 per linear,
one M per layer) on the embedded English text (``data=text``; the Pile is not needed to
time a step), runs on ``runtime.device=cuda`` and prints ours next to the paper's.

    python scripts/gpu_410m.py                      # on a machine with a CUDA GPU
    python scripts/gpu_410m.py --device cpu --model pythia_tiny --seq-len 64   # dry run

Writes ``results/bench/gpu_410m.{csv,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from dve_repro.bench import _header, _markdown, lm_row

# Paper Table 1 (Pythia-410M, 1% of the Pile, one A100, p̃ = 1024), in the order printed there.
PAPER = [
    ("storage", "171 GB (LoGra: 170 GB)"),
    ("embedding-step GPU memory", "0.84 GB vs 63.6 GB"),
    ("embedding throughput", "667.5 vs 41.6 points/s"),
    ("query throughput", "640 points/s"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="pythia_410m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--points", type=int, default=0, help="training points to size storage for (0 = the data's)")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    args = ap.parse_args()
    import time

    started = time.perf_counter()
    ov = ["data=text", f"model={args.model}", f"data.seq_len={args.seq_len}", "data.n_train=256",
          f"runtime.device={args.device}", f"train.dtype={args.dtype}", "projection.k_in=32", "projection.k_out=32",
          "embed.blocks=layer"]
    row = lm_row(["experiment=pythia410m_pile1pct", *ov], args.steps, alg1_steps=64)
    n = args.points or None
    if n:
        row["storage_run_bytes"] = row["storage_bytes_per_point"] * n
    df = pd.DataFrame([row])
    peak = row["peak_gpu_bytes"]
    peak_text = "n/a (not on a GPU)" if peak != peak else f"{peak / 1e9:.1f} GB"  # NaN off the GPU
    ours = [
        ("storage", f"{row['storage_bytes_per_point'] / 1e3:.1f} kB/point"
         + (f" → {row['storage_run_bytes'] / 1e9:.1f} GB for {n:,} points" if n else "")),
        ("embedding-step GPU memory", f"{row['mem_alg1_bytes'] / 1e9:.2f} GB (per-layer M) vs "
         f"{row['mem_full_M_bytes'] / 1e9:.1f} GB (one p̃×p̃ M); capture peak {peak_text}"),
        ("embedding throughput", f"{row['alg1_pts_per_s']:.1f} points/s (Algorithm 1); capture "
         f"{row['capture_pts_per_s']:.1f} points/s, +{100 * row['capture_overhead']:.0f}% over plain training; "
         f"recompute at θ_T {row['recompute_pts_per_s']:.1f} points/s"),
        ("query throughput", f"{row['query_pts_per_s']:.1f} points/s"),
    ]
    table = pd.DataFrame({"metric": [m for m, _ in PAPER], "paper": [p for _, p in PAPER], "ours": [o for _, o in ours]})
    print(_markdown(table))
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "gpu_410m.csv", index=False)
    header = _header("python scripts/gpu_410m.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()), 0,
                     started, "n/a")
    (args.out / "gpu_410m.md").write_text(f"# Pythia-410M efficiency (paper Table 1)\n\n{header}\n\n"
                                          f"{_markdown(table)}\n\n{_markdown(df)}\n")


if __name__ == "__main__":
    main()
