"""Speed and memory benchmarks (``dve bench …``), one module per benchmark → ``results/bench/``.

* :mod:`~dve_repro.bench.harness` — what they share: the session (thread count restored
  after it, quiet bars, scratch runs), timing, medians over interleaved rounds, the header
  line and the markdown tables (:func:`dve_repro.tables.markdown_table`);
* :mod:`~dve_repro.bench.embed` — ``dve bench embed``: capture, Algorithm 1 / 2 and the
  LoGra-style alternative on the MNIST MLP;
* :mod:`~dve_repro.bench.tsloo` — ``dve bench tsloo``: batched ground-truth retraining
  against one retraining per point;
* :mod:`~dve_repro.bench.lm` — ``dve bench lm``: E2 on the CPU for pythia_tiny and pythia_14m;
* :mod:`~dve_repro.bench.adamw` — ``dve bench adamw``: the AdamW-aware recursion against
  the SGD one;
* :mod:`~dve_repro.bench.gpu` — ``dve bench gpu``: Pythia-410M, paper Table 1, on the
  real pipeline (``scripts/gpu_410m.py``).
"""

from dve_repro.bench.adamw import bench_adamw
from dve_repro.bench.embed import EMBED_MEM_COLS, EMBED_SPEED_COLS, bench_embed
from dve_repro.bench.gpu import bench_gpu
from dve_repro.bench.lm import LM_COLS, bench_lm, lm_row
from dve_repro.bench.tsloo import TSLOO_COLS, bench_tsloo

__all__ = [
    "EMBED_MEM_COLS",
    "EMBED_SPEED_COLS",
    "LM_COLS",
    "TSLOO_COLS",
    "bench_adamw",
    "bench_embed",
    "bench_gpu",
    "bench_lm",
    "bench_tsloo",
    "lm_row",
]
