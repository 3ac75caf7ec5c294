"""``dve reproduce``: every experiment this machine can run, ``--jobs`` stages at a time, then the report.

A stage is one ``dve`` command (run in its own process, so that one stage's failure or memory
never reaches the next). Finished work is reused by the commands themselves (their run folders
are keyed by fingerprints), so a second ``dve reproduce`` only rebuilds tables and figures.
One line per stage goes to the terminal (started, then ``ok`` / ``FAILED`` with its time); the
stage's own output goes to ``<out_root>/reproduce/<stage>.log``.

Every stage runs on one torch thread (``OMP_NUM_THREADS=1`` in its environment), whatever the
machine: the models here are too small to gain from a second thread, and a fixed thread count
fixes the last bits of every result (ATen splits reductions by thread count), so the committed
results do not depend on how many cores made them. Independent stages run side by side
(``--jobs``, default 2); a stage waits for the stages it reads (``after``), and a benchmark
(``alone``) runs with nothing beside it, last.

What survives, and where:

* ``<results>/reproduce.json`` (committed): per stage its command, the claims it feeds and
  ``ok`` / ``failed`` with the error line — no timings, so a reproduce on an unchanged tree
  leaves ``git status`` clean. :mod:`dve_repro.report` marks a failed stage's claims "failed".
* ``<out_root>/reproduce/timings.csv`` (ignored): seconds per stage, appended per run.

Profiles: ``full`` (the committed experiments, as their configs say) and ``tiny`` (the same
commands shrunk to seconds, for the pipeline's smoke test; it must be given a results folder
other than ``results/`` so that it can never replace committed results).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dve_repro.artifacts import write_json
from dve_repro.errors import DveError

STATUS_FILE = "reproduce.json"

_MNIST_TINY = ("data.n_train=256", "data.n_val=64", "data.n_test=64", "model.hidden=[8]", "train.epochs=2",
               "train.batch_size=32", "projection.k_in=16", "projection.k_out=8", "baselines.bootstrap=50")
_COMPARE_TINY = ("tsloo.n_points=12", "baselines.val_points=5", "baselines.curvatures=[hessian]")
_LM_TINY = ("data.max_docs=400", "data.seq_len=32", "data.n_train=48", "data.n_val=4", "train.batch_size=8",
            "schedule.warmup_steps=2", "trajectory.dense_until=0", "trajectory.checkpoint_every=2",
            "projection.k_in=4", "projection.k_out=4", "embed.segments=3")
_SELECT_TINY = ("select.windows=fractions", "select.early_end=0.125", "select.late_start=0.875",
                "select.n_split=8", "select.val_batch=4", "select.seeds=[0,1]")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One command of the reproduction.

    ``args`` are the ``dve`` arguments as committed; ``results`` the folder (under the results
    root) the command writes, or ``None`` for a benchmark (written under the run root: timings
    are not committed by a reproduce); ``tiny`` the overrides of the tiny profile."""

    name: str
    claims: tuple[str, ...]
    args: tuple[str, ...]
    results: str | None
    tiny: tuple[str, ...] = ()
    after: tuple[str, ...] = ()  # stages whose run folders this one reads: it starts once they ended
    alone: bool = False  # a benchmark: timed with no other stage running

    def command(self) -> str:
        return " ".join(("dve", *self.args))


#: In dispatch order: the longest first (measured from nothing, README), so that two workers end
#: together; the report and ``reproduce.json`` do not depend on this order.
STAGES: tuple[Stage, ...] = (
    Stage("lm-sgd", ("X-sgd-lm",), ("compare-tsloo", "experiment=pythia_tiny_sgd"), "pythia_tiny_sgd",
          (*_LM_TINY, "tsloo.n_points=4", "tsloo.chunk_size=4", "baselines.val_points=0", "baselines.curvatures=[hessian]", "baselines.bootstrap=50")),
    Stage("e5-noisy", ("E5-noisy",), ("select", "experiment=pythia_tiny_selection_noisy"),
          "pythia_tiny_selection_noisy", _LM_TINY + _SELECT_TINY),
    Stage("e1-adamw", ("X-adamw",), ("compare-tsloo", "experiment=mnist_mlp_adamw"), "mnist_mlp_adamw",
          _MNIST_TINY + _COMPARE_TINY + ("baselines.curvatures=[hessian,mc]",)),
    Stage("e5", ("E5-early-late", "E5-early"), ("select", "experiment=pythia_tiny_selection"),
          "pythia_tiny_selection", _LM_TINY + _SELECT_TINY),
    Stage("e1", ("E1-single", "E1-all", "E1-if"), ("compare-tsloo", "experiment=mnist_mlp"), "mnist_mlp",
          _MNIST_TINY + _COMPARE_TINY),
    Stage("lm-adamw", ("X-adamw-lm",), ("compare-tsloo", "experiment=pythia_tiny_adamw"), "pythia_tiny_adamw",
          (*_LM_TINY, "tsloo.n_points=4", "tsloo.chunk_size=4", "baselines.val_points=0", "baselines.curvatures=[hessian]", "baselines.bootstrap=50")),
    Stage("e3", ("E3",), ("analyze", "phases", "experiment=pythia_tiny"), "pythia_tiny", _LM_TINY),
    Stage("e4", ("E4",), ("analyze", "dynamics", "experiment=pythia_tiny"), "pythia_tiny", _LM_TINY,
          after=("e3",)),  # the same training run
    Stage("e5-phases", ("E5-early-late",), ("analyze", "phases", "experiment=pythia_tiny_selection"),
          "pythia_tiny_selection", _LM_TINY, after=("e5",)),
    Stage("e6", ("E6",), ("detect-mislabeled", "experiment=mnist_noise"), "mnist_noise",
          ("data.n_train=200", "data.n_val=100", "data.n_test=0", "train.epochs=3", "train.batch_size=32",
           "model.hidden=[8]", "baselines.bootstrap=50", "baselines.cg_iters=20")),
    Stage("e2-cpu", ("T1-throughput",), ("bench", "lm"), None, ("--quick",), alone=True),
)

PROFILES = ("full", "tiny")


def plan(only: list[str] | None = None) -> list[Stage]:
    """The stages to run, in order; ``only`` picks some by name (unknown names are an error)."""
    if not only:
        return list(STAGES)
    names = [s.name for s in STAGES]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise DveError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}")
    return [s for s in STAGES if s.name in only]


def stage_argv(stage: Stage, profile: str, results_root: Path, out_root: Path | None) -> list[str]:
    """The ``dve`` arguments of ``stage`` under ``profile``. The full profile writing to the
    committed ``results/`` runs the command exactly as committed (so its ``COMMAND.txt`` is the
    one a user would type); any other results root is passed as ``--results``."""
    args = list(stage.args)
    if profile == "tiny":
        extra = [a for a in stage.tiny if not a.startswith("--")]
        last = {a.split("=", 1)[0]: a for a in extra}  # a later override of the same key wins
        args += [a for a in extra if last[a.split("=", 1)[0]] is a]
    if out_root is not None and stage.results is not None:
        args.append(f"runtime.out_root={out_root}")
        if stage.args[0] in ("analyze", "select", "compare-tsloo") and "pythia" in " ".join(stage.args):
            args.append(f"data.cache_dir={out_root / 'tokens'}")
    if stage.results is None:
        args += ["--out", str((out_root or Path("results/runs")) / "bench")]
        args += [a for a in stage.tiny if a.startswith("--")] if profile == "tiny" else []
    elif Path(results_root) != Path("results"):
        args += ["--results", str(Path(results_root) / stage.results)]
    return args


def _ready(waiting: list[Stage], running: dict, jobs: int) -> list[Stage]:
    """The stages to start now, in dispatch order: free slots, their ``after`` stages ended
    (or not planned), and an ``alone`` stage only when nothing else runs or waits before it."""
    if any(r[0].alone for r in running.values()):
        return []
    pending = {st.name for st in waiting} | set(running)
    out: list[Stage] = []
    for st in waiting:
        if len(running) + len(out) >= jobs:
            break
        if any(a in pending for a in st.after):
            continue
        if st.alone:
            if not running and not out and st is waiting[0]:
                out.append(st)
            break  # nothing is started past a benchmark: it runs alone, after the others
        out.append(st)
    return out


def _error_line(log: Path, rc: int) -> str:
    """The stage's ``error: …`` line (the CLI prints exactly one), or its exit code."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [ln.strip() for ln in lines if ln.startswith(("error:", "interrupted:"))]
    if errors:
        return errors[-1]
    # a usage error is drawn in a box by the CLI library: its text, without the frame
    text = [ln.strip(" │╭╮╰╯─\t") for ln in lines]
    text = [t for t in text if t and t != "Error"]
    return f"exit code {rc}: {text[-1][:200]}" if text else f"exit code {rc}"


def _load_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"stages": {}}


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s"


def run_reproduce(profile: str, results_root: Path, out_root: Path | None = None,
                  only: list[str] | None = None, dry_run: bool = False, echo=print,
                  readme: Path | None = None, jobs: int = 2) -> int:
    """Run the stages of :data:`STAGES` (or ``only`` those), ``jobs`` at a time, then write
    the report.

    Returns the number of failed stages. A failed stage does not stop the others."""
    if jobs < 1:
        raise DveError(f"--jobs must be >= 1 (got {jobs})")
    if profile not in PROFILES:
        raise DveError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    results_root = Path(results_root)
    if profile == "tiny" and results_root.resolve() == Path("results").resolve():
        raise DveError("the tiny profile would overwrite the committed results/; give --results-root DIR")
    stages = plan(only)
    if profile == "tiny" and out_root is None:
        out_root = results_root / "runs"
    log_dir = (out_root or Path("results/runs")) / "reproduce"
    if dry_run:
        for i, st in enumerate(stages, 1):
            echo(f"[{i:>2}/{len(stages)}] {st.name:<10} dve {' '.join(stage_argv(st, profile, results_root, out_root))}")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    results_root.mkdir(parents=True, exist_ok=True)
    status_path = results_root / STATUS_FILE
    status = _load_status(status_path)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    env = dict(os.environ, DVE_PROGRESS_EVERY=os.environ.get("DVE_PROGRESS_EVERY", "60"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               # a stage reading a folder another still writes waits for it instead of refusing
               DVE_LOCK_WAIT=os.environ.get("DVE_LOCK_WAIT", "7200"))
    number = {st.name: i for i, st in enumerate(stages, 1)}

    def finished(st: Stage, rc: int, dt: float, log: Path) -> None:
        nonlocal failed
        if rc == 130:
            raise KeyboardInterrupt
        entry = {"command": st.command(), "claims": list(st.claims), "status": "ok" if rc == 0 else "failed"}
        if rc != 0:
            failed += 1
            entry["error"] = _error_line(log, rc)
        echo(f"[{number[st.name]:>2}/{len(stages)}] {st.name:<10} {'ok' if rc == 0 else 'FAILED'} in {_clock(dt)}"
             + ("" if rc == 0 else f": {entry['error']}"))
        status["stages"][st.name] = entry
        write_json(status_path, {"profile": profile, "stages": {s.name: status["stages"][s.name]
                                                                 for s in STAGES if s.name in status["stages"]}})
        _append_timing(log_dir / "timings.csv", started, profile, st.name, rc, dt)

    failed, t_start = 0, time.perf_counter()
    waiting, running = list(stages), {}  # running: name -> (stage, process, log file, start time)
    try:
        while waiting or running:
            for name, (st, proc, fh, t0) in list(running.items()):
                if proc.poll() is not None:
                    fh.close()
                    del running[name]
                    finished(st, proc.returncode, time.perf_counter() - t0, Path(fh.name))
            ready = _ready(waiting, running, jobs)
            if waiting and not running and not ready:  # only a cycle of `after` could do this
                raise DveError(f"stages {', '.join(st.name for st in waiting)} wait for each other")
            for st in ready:
                argv = stage_argv(st, profile, results_root, out_root)
                log = log_dir / f"{st.name}.log"
                echo(f"[{number[st.name]:>2}/{len(stages)}] {st.name:<10} dve {' '.join(argv)}  (log: {log})")
                fh = open(log, "w")  # noqa: SIM115 (closed when the stage ends)
                proc = subprocess.Popen([sys.executable, "-m", "dve_repro", *argv], stdout=fh,
                                        stderr=subprocess.STDOUT, env=env)
                running[st.name] = (st, proc, fh, time.perf_counter())
                waiting.remove(st)
            if running:
                time.sleep(0.2)
    except BaseException:
        for _st, proc, fh, _t0 in running.values():  # Ctrl-C: no stage goes on alone
            proc.terminate()
            proc.wait()
            fh.close()
        raise
    total = time.perf_counter() - t_start
    from dve_repro.report import write_report

    report = write_report(results_root, readme=readme)
    echo(f"report: {report}")
    echo(f"total {_clock(total)} (wall clock, {jobs} at a time) for {len(stages)} stage(s); {failed} failed")
    return failed


def _append_timing(path: Path, started: str, profile: str, stage: str, rc: int, seconds: float) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["run_started", "profile", "stage", "exit_code", "seconds"])
        w.writerow([started, profile, stage, rc, f"{seconds:.1f}"])
