"""``dve bench lm``: E2 on the CPU — capture, Algorithm 1, storage, queries and recompute at θ_T.

:func:`lm_row` measures one language model (pythia_tiny unless the overrides name another
experiment) on the real training step, capture hooks, projection and Algorithm 1, in one
process, the plain and the capturing step interleaved; :func:`bench_lm` runs it for
pythia_tiny and pythia_14m and writes ``lm.csv`` / ``lm.md`` (:mod:`dve_repro.bench.harness`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dve_repro import torch_state
from dve_repro.bench.harness import Session, header, median, print_table, timed, write_outputs

LM_NOTES = [
    "All measurements in one process on a freshly initialised model (speed does not depend on "
    "training progress); step times are medians over `steps` rounds, and inside a round the plain "
    "step and the capturing step run one right after the other (same load).",
    "`capture_overhead` = capturing step ÷ plain step (aim ≤ 1.1 on pythia_tiny): the hooks keep every "
    "captured linear's input and output gradient, and the fused Kronecker projection turns them into "
    "p̃ float32 numbers per sequence (no extra backward); the rows go to a background writer.",
    "Capture profile: `hooked_step_s` = the capturing step's forward + backward + update with the hooks "
    "on (compare `plain_step_s`), `project_s` = its projection, `queue_wait_s` = time blocked on the "
    "row writer; `*_1t` the same at 1 torch thread, in the same rounds.",
    "`alg1_pts_per_s`: Algorithm 1 with one M per layer (embed.blocks=layer) on float32 rows of "
    "`alg1_steps` steps; `mem_alg1_bytes` (analytic) = per-layer M's (Σ p̃_l²·8) + one chunk of 64 "
    "steps of rows and embeddings; `mem_full_M_bytes` = one p̃×p̃ float64 M over all layers.",
    "`storage_bytes_per_point` = p̃·4 (float32 rows); `storage_run_bytes` for the experiment's "
    "training set. The recompute-at-θ_T alternative (LoGra-style) stores the same rows; its cost is "
    "one gradient pass over the training set at θ_T (`recompute_pts_per_s`).",
    "`query_pts_per_s`: projected gradients of validation sequences at θ and their scores against "
    "every stored embedding row (a dot product each).",
    "`capture_layers` says which weights are captured (`model.capture_layers`; pythia_tiny: every "
    "weight matrix — the block linears, the output head and the token embedding; the LayerNorms "
    "are left out), `captured_params` how many parameters they hold.",
]
LM_COLS = [
    "model", "params", "capture_layers", "captured_params", "device", "dtype", "batch", "seq_len", "p_tilde",
    "plain_step_s", "capture_step_s", "capture_overhead", "hooked_step_s", "project_s", "queue_wait_s",
    "plain_step_1t_s", "capture_step_1t_s", "capture_overhead_1t", "hooked_step_1t_s", "project_1t_s",
    "queue_wait_1t_s", "train_pts_per_s", "capture_pts_per_s",
    "alg1_steps", "alg1_pts_per_s", "mem_alg1_bytes", "mem_full_M_bytes", "peak_gpu_bytes",
    "storage_bytes_per_point", "storage_run_bytes", "query_pts_per_s", "recompute_pts_per_s",
]


class _Rows:
    """An in-memory stand-in for the gradient store (benchmarks write nothing to disk)."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def write(self, t, rows, curv=None, start=0, whole=True):
        self.rows.append(rows.detach().to("cpu", torch.float32))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lm_row(overrides: list[str], steps: int, alg1_steps: int = 64, queries: int = 16,
           other_threads: Sequence[int] = ()) -> dict:
    """One benchmark row for the language model named by ``overrides`` (composed on top of
    ``experiment=pythia_tiny`` unless they name another experiment). ``other_threads``: torch
    thread counts at which the plain and the capturing step are timed too, in the same rounds
    (columns ``*_{n}t``)."""
    from dve_repro import embedding
    from dve_repro.capture import Featurizer
    from dve_repro.config import compose
    from dve_repro.embed_stage import query_features
    from dve_repro.optim import init_state
    from dve_repro.projection import Projector
    from dve_repro.tasks import build_task, initial_params, resolve_device
    from dve_repro.train import _TrainCapture, capture_blocks, train_step

    base = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=pythia_tiny"]
    cfg = compose([*base, "runtime.progress=false", *overrides])
    device = resolve_device(cfg.runtime.device)
    task = build_task(cfg, device)
    blocks = capture_blocks(task)
    proj = Projector(cfg.projection, blocks)
    feat = Featurizer(task, blocks, proj, "hooks")
    store = _Rows()
    cap = _TrainCapture(feat, store, "ef", 1, 0)
    params = initial_params(task)
    state = init_state(params, cfg.optim)
    B = cfg.train.batch_size
    x, y = task.batch(np.arange(B))
    w = torch.full((B,), 1.0 / B, dtype=task.weight_dtype, device=x.device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def plain():
        out = train_step(task, params, state, 0, x, y, w, 1e-4, cfg)
        _sync(device)
        return out

    def capture():
        out = cap.step(task, params, state, 0, x, y, w, 1e-4, cfg)
        _sync(device)
        return out

    plain(), capture()  # warm-up (lazy init, allocator, projection matrices)
    main = torch.get_num_threads()
    thread_list = [main, *[t for t in other_threads if t != main]]
    times: dict[str, list[float]] = {}
    for r in range(steps):
        for th in thread_list:
            tag = "" if th == main else f"_{th}t"
            with torch_state.threads(th):
                for kind in (("plain", "capture") if r % 2 == 0 else ("capture", "plain")):
                    before = cap.profile()
                    times.setdefault(f"{kind}{tag}", []).append(timed(plain if kind == "plain" else capture)[0])
                    if kind == "capture":
                        for k, v in cap.profile().items():
                            times.setdefault(f"{k}{tag}", []).append(v - before[k])
    cap.store.flush()
    t_plain, t_cap = times["plain"], times["capture"]
    per_thread = {}
    for th in thread_list:
        tag = "" if th == main else f"_{th}t"
        pl, cp = median(times[f"plain{tag}"]), median(times[f"capture{tag}"])
        if tag:
            per_thread |= {f"plain_step{tag}_s": pl, f"capture_step{tag}_s": cp, f"capture_overhead{tag}": cp / pl}
        per_thread |= {f"hooked_step{tag}_s": median(times[f"step_s{tag}"]),
                       f"project{tag}_s": median(times[f"project_s{tag}"]),
                       f"queue_wait{tag}_s": median(times[f"queue_wait_s{tag}"])}
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    p = proj.out_dim
    # Algorithm 1 on alg1_steps steps of (tiled) captured rows: its cost does not depend on values.
    rows = torch.cat(store.rows)
    G = rows.repeat(math.ceil(alg1_steps * B / rows.shape[0]), 1)[: alg1_steps * B].numpy()
    offsets = np.arange(alg1_steps + 1) * B
    wts = np.full(alg1_steps, 1e-4 / B)
    slices = proj.block_slices()
    t_alg1, _ = timed(lambda: embedding.algorithm1(G, offsets, wts, blocks=slices, max_matrix_gb=64.0))
    sizes = [s.stop - s.start for s in slices]
    mem_alg1 = sum(d * d for d in sizes) * 8 + 2 * min(64, alg1_steps) * B * p * 8
    # Queries: projected validation gradients at θ, scored against every stored row.
    xq, yq = task.x_val[:queries], task.y_val[:queries]
    E = torch.from_numpy(G)

    def query():
        q = query_features(feat, params, xq, yq).float().cpu()
        _sync(device)
        return E @ q.T

    query()
    t_query, _ = timed(query)
    xr, yr = task.batch(np.arange(B))
    feat.features(params, xr, yr)
    t_re, _ = timed(lambda: (feat.features(params, xr, yr), _sync(device)))
    n_captured = sum(b.size for b in blocks)
    return {
        "model": cfg.model.preset, "params": sum(v.numel() for v in params.values()),
        "capture_layers": cfg.model.capture_layers, "captured_params": n_captured, "device": device, "dtype": cfg.train.dtype, "batch": B,
        "seq_len": cfg.data.seq_len, "p_tilde": p,
        "plain_step_s": median(t_plain), "capture_step_s": median(t_cap),
        "capture_overhead": median(t_cap) / median(t_plain), **per_thread,
        "train_pts_per_s": B / median(t_plain), "capture_pts_per_s": B / median(t_cap),
        "alg1_steps": alg1_steps, "alg1_pts_per_s": alg1_steps * B / t_alg1,
        "mem_alg1_bytes": mem_alg1, "mem_full_M_bytes": p * p * 8, "peak_gpu_bytes": peak,
        "storage_bytes_per_point": p * 4, "storage_run_bytes": p * 4 * task.n_train,
        "query_pts_per_s": xq.shape[0] / t_query, "recompute_pts_per_s": B / t_re,
    }


def bench_lm(out_dir: Path, quick: bool = False, *, threads: int = 2, steps: int | None = None) -> pd.DataFrame:
    """E2 on the CPU: capture, Algorithm 1, storage, queries and the recompute-at-θ_T
    alternative for pythia_tiny and pythia_14m → ``<out_dir>/lm.{csv,md}``."""
    steps = steps or (2 if quick else 5)
    specs = [("pythia_tiny", ["data.n_train=256", "data.seq_len=32"] if quick else ["data.n_train=1024"])]
    if not quick:
        specs.append(("pythia_14m", ["model=pythia_14m", "data.n_train=1024"]))
    with Session(out_dir, threads, keep_runs=False) as sess:
        rows = []
        for name, ov in specs:
            sess.say(f"bench lm: {name}")
            rows.append(lm_row([*ov, "runtime.device=cpu", "train.dtype=float32"], steps,
                               alg1_steps=16 if quick else 64, other_threads=(1,)))
        df = pd.DataFrame(rows, columns=LM_COLS)
        head = header("dve bench lm" + (" --quick" if quick else ""), threads, sess.started, sess.load_start)
    col = LM_COLS.index
    overhead = ["model", "p_tilde", *LM_COLS[col("plain_step_s") : col("queue_wait_1t_s") + 1]]
    throughput = [*LM_COLS[: col("capture_overhead") + 1],
                  *LM_COLS[col("train_pts_per_s") : col("alg1_pts_per_s") + 1], "query_pts_per_s", "recompute_pts_per_s"]
    memory = ["model", "p_tilde", *LM_COLS[col("mem_alg1_bytes") : col("storage_run_bytes") + 1]]
    write_outputs(out_dir, "lm", df, head, LM_NOTES,
                  [("Capture overhead and profile", overhead), ("Throughput", throughput),
                   ("Memory and storage", memory)])
    print_table("bench lm", df, ["model", "p_tilde", "plain_step_s", "capture_overhead", "capture_overhead_1t",
                                 "project_s", "capture_pts_per_s", "alg1_pts_per_s", "query_pts_per_s",
                                 "recompute_pts_per_s", "storage_bytes_per_point"])
    return df
