"""E2 on a GPU: the Pythia-410M row of paper Table 1 on the real pipeline, beside the paper's.

A thin driver over :func:`dve_repro.bench.gpu.bench_gpu` (= ``dve bench gpu``): ``dve train``
with capture for ``--steps`` steps, ``dve embed``, the recompute-at-θ_T alternative and
``dve score``, with ``torch.cuda.max_memory_allocated`` per stage. Without a Pile folder it
runs on the embedded English text (``data=text``; a step's cost does not depend on the text).

    python scripts/gpu_410m.py                              # on a machine with a CUDA GPU
    python scripts/gpu_410m.py data.path=/data/pile         # on the Pile's shards

Writes ``results/bench/gpu.{csv,md}`` and ``results/bench/phases/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dve_repro.bench import bench_gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "overrides", nargs="*", help="overrides on top of experiment=pythia410m_pile1pct"
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    args = ap.parse_args()
    ov = list(args.overrides)
    if not any(o.startswith("data.path=") or o.startswith("data=") for o in ov):
        ov = ["data=text", "data.seq_len=1024", "data.n_train=0", *ov]
    bench_gpu(args.out, ov, steps=args.steps, device=args.device)


if __name__ == "__main__":
    main()
