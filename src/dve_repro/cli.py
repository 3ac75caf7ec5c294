"""The ``dve`` command line (Typer). Every command takes Hydra-style overrides.

Errors a user can cause are printed as one line (``error: …``) with exit code 2; an
interrupted command exits 130 and resumes when rerun. Any other failure is one line with
exit code 1; ``DVE_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer

from dve_repro.errors import (
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    DveError,
    describe_os_error,
)

OVERRIDE_HELP = (
    "Hydra-style overrides, e.g. `experiment=mnist_mlp optim.lr=0.05 trajectory.checkpoint_every=1`. "
    "Pick a group option with `group=option` (data, model, optim, schedule, projection, ...), set a "
    "value with `key=value`, a list with `key=[a,b]`."
)

RESULTS_HELP = ("Output folder (default results/<experiment> for the experiment as committed; with overrides "
                "besides experiment= and runtime.*, an ignored folder under runtime.out_root).")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dve — data value embeddings (Wang et al., ICLR 2025) and their check against retraining.",
    pretty_exceptions_enable=False,
)


def command_line(name: str, overrides: list[str] | None) -> str:
    """The command as typed (``dve`` + its arguments), for the ``COMMAND.txt`` beside results;
    when dve runs inside another program (``CliRunner``, a notebook) its ``sys.argv`` is that
    program's, and the command is rebuilt from its name and overrides."""
    argv = sys.argv
    if len(argv) > 1 and Path(argv[0]).name in ("dve", "__main__.py") and argv[1] == name.split()[0]:
        return " ".join(["dve", *argv[1:]])
    return " ".join(["dve", name, *(overrides or [])])


def default_results(cfg, overrides: list[str], kind: str, sub: str = "") -> Path:
    """Where a command writes when ``--results`` is not given: ``results/<experiment>[/sub]`` for
    the experiment as committed (no override besides ``experiment=`` and ``runtime.*``); any
    other override makes an ad-hoc run, written under the ignored run root
    (``<out_root>/<experiment>/<kind>-<fingerprint of those overrides>/``) so that it never
    replaces the committed results (a message names the folder)."""
    from dve_repro.config import fingerprint

    extra = sorted(o for o in overrides if not o.startswith(("experiment=", "runtime.")))
    if not extra:
        return Path("results") / cfg.name / sub if sub else Path("results") / cfg.name
    return Path(cfg.runtime.out_root) / cfg.name / f"{kind}-{fingerprint(extra)}"


def _results(cfg, overrides: list[str] | None, explicit: Path | None, kind: str, sub: str = "") -> Path:
    if explicit is not None:
        return Path(explicit)
    out = default_results(cfg, list(overrides or []), kind, sub)
    if not out.is_relative_to("results") or out.parts[:2] == ("results", "runs"):
        from dve_repro import ui

        ui.log(f"ad-hoc overrides: writing to {out} (the committed results/{cfg.name}/ is written only by the "
               "experiment as committed, or with --results)")
    return out


@app.callback()
def _root() -> None:
    """dve — data value embeddings (Wang et al., ICLR 2025) and their check against retraining."""


def _experiments_help() -> str:
    try:
        from dve_repro.config import list_experiments

        return "Experiments: " + ", ".join(list_experiments()) + "."
    except Exception:  # help text must never fail
        return ""


def guarded(fn):
    """Turn user errors into one line + exit 2, and Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dve_repro import artifacts

        artifacts.record_invocation(_invocation(fn.__name__))
        try:
            return fn(*args, **kwargs)
        except DveError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing finished was lost; rerun the same command to resume", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:
            typer.echo("error: out of memory; use a smaller projection, embed.blocks=layer or fewer points", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except (typer.Exit, SystemExit):
            raise
        except BrokenPipeError:  # `dve … | head`: the reader left; stop quietly with 128+SIGPIPE, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as exc:
            if _debug():
                raise
            typer.echo(f"error: {describe_os_error(exc)}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as exc:
            if _debug():
                raise
            if isinstance(exc, RuntimeError) and "allocate" in str(exc):
                typer.echo("error: out of memory: " + _one_line(exc) + "; use a smaller model or fewer points", err=True)
                raise typer.Exit(EXIT_USER_ERROR) from None
            typer.echo(f"error: internal error {type(exc).__name__}: {_one_line(exc)} "
                       "(a bug in dve; run with DVE_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(EXIT_INTERNAL_ERROR) from None

    return wrapper


def _invocation(function: str) -> str:
    """The command line of this process for its run folders' records: ``dve`` + the arguments
    when it is the ``dve`` program, else (``CliRunner``, a notebook) the command function called."""
    argv = sys.argv
    if len(argv) > 1 and Path(argv[0]).name in ("dve", "__main__.py"):
        return " ".join(["dve", *argv[1:]])
    return f"dve command function {function}() called in-process"


def _debug() -> bool:
    return os.environ.get("DVE_DEBUG", "") not in ("", "0")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()[:300]


#: The commands that run on several processes under torchrun (distributed.py).
RANKED_COMMANDS = ("train", "embed")


def _ranks() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _setup(overrides: list[str], command: str = ""):
    from dve_repro import ui
    from dve_repro.config import compose

    if _ranks() > 1 and command not in RANKED_COMMANDS:
        raise DveError(f"this command runs on one process; run it without torchrun (torchrun runs "
                       f"{' and '.join(f'dve {c}' for c in RANKED_COMMANDS)})")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    cfg = compose(overrides)
    ui.configure(cfg.runtime.progress)  # the one place a command's progress choice is made
    if _ranks() > 1:  # join torchrun's group before anything is put on a device (cuda:<local rank>)
        from dve_repro import distributed
        from dve_repro.tasks import resolve_device

        distributed.context(resolve_device(cfg.runtime.device))
    return cfg


def _split_run_dir(args: list[str]) -> tuple[Path | None, list[str]]:
    """``dve embed RUN_DIR k=v …`` or ``dve embed k=v …``: the first non-override is a path."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise DveError(f"expected at most one run directory, got {paths}")
    return (Path(paths[0]) if paths else None), [a for a in args if "=" in a]


OverridesArg = typer.Argument(None, help=OVERRIDE_HELP, show_default=False)


@app.command(help="Train a model and record its trajectory (batches, learning rates, checkpoints). " + OVERRIDE_HELP)
@guarded
def train(
    overrides: list[str] = OverridesArg,
    force: bool = typer.Option(False, "--force", help="Redo a finished run instead of reusing it."),
) -> None:
    from dve_repro.train import run_training

    cfg = _setup(overrides or [], "train")
    path = run_training(cfg, force=force)
    typer.echo(str(path))


# The help of `train` lists the experiments (computed at import so --help shows it).
train.__doc__ = None
app.registered_commands[-1].help = (
    "Train a model and record its exact trajectory (batch indices, learning rates, checkpoints, "
    "optionally projected per-sample gradients).\n\n" + OVERRIDE_HELP + "\n\n" + _experiments_help()
)


@app.command(help="Compute data value embeddings for a training run: capture gradients if needed, run "
             "Algorithm 1 (embed.algorithm=1) or 2, score against the validation set. Give a training "
             "RUN_DIR, or the overrides that name it (e.g. experiment=mnist_mlp). " + OVERRIDE_HELP)
@guarded
def embed(
    args: list[str] = typer.Argument(None, help="[RUN_DIR] followed by overrides.", show_default=False),
    force: bool = typer.Option(False, "--force", help="Recompute a finished embedding."),
) -> None:
    from dve_repro.embed_stage import embed_overrides, open_run, run_embedding

    run_dir, overrides = _split_run_dir(args or [])
    cfg, run = open_run(run_dir, _setup(embed_overrides(run_dir, overrides), "embed"))
    typer.echo(str(run_embedding(cfg, run, force=force)))


@app.command(help="Score a query set against saved embeddings without recomputing them. Give an embedding "
             "directory written by `dve embed`, or the same overrides as `dve embed` (e.g. experiment=mnist_mlp), "
             "which name it. Prints the path of the scores and, on stderr, the most and least helpful points.")
@guarded
def score(
    args: list[str] = typer.Argument(None, help="[EMBED_DIR] followed by overrides: with EMBED_DIR, projection "
                                     "overrides that must match the saved ones; without, `dve embed`'s overrides.",
                                     show_default=False),
    split: str = typer.Option("test", help="Query split of the run's data: val or test."),
    queries: Path = typer.Option(None, help="An .npz file with arrays x (features) and y (labels)."),
    top: int = typer.Option(5, "--top", help="How many of the highest and lowest scored points to print."),
) -> None:
    from dve_repro.embed_stage import embed_dir_for, score_queries, score_summary

    embed_path, overrides = _split_run_dir(args or [])
    if embed_path is None:
        if not overrides:
            raise DveError("give an embedding directory or the overrides of `dve embed` (e.g. experiment=mnist_mlp)")
        embed_path, overrides = embed_dir_for(_setup(overrides)), []
    out = score_queries(embed_path, overrides, split, queries)
    for line in score_summary(out, top):
        typer.echo(line, err=True)
    typer.echo(str(out))


@app.command(help="Check every run folder under RUN_DIR (a run folder, an experiment folder or results/runs): "
             "each file's size and full checksum against the manifest written beside DONE, and that the folder's "
             "name is the fingerprint of its config. One line per folder; exit 1 when any is damaged.")
@guarded
def verify(run_dir: Path = typer.Argument(..., help="A run folder or a folder of run folders.")) -> None:
    from dve_repro.artifacts import verify_tree

    code = verify_tree(run_dir, typer.echo)
    if code:
        raise typer.Exit(code)


@app.command("compare-tsloo", help="E1: compare DVEmb and baselines with ground-truth TSLOO by retraining. "
             "Runs what is missing (train, embed, retraining, baselines) and writes tables and figures to "
             "results/<experiment>/. " + OVERRIDE_HELP)
@guarded
def compare_tsloo(
    overrides: list[str] = OverridesArg,
    results: Path = typer.Option(None, "--results", help=RESULTS_HELP),
    shard: str = typer.Option(None, "--shard", help="Only compute ground-truth shard i/n (e.g. 0/2); "
                              "rerun without --shard once all shards are done to merge and compare."),
    force: bool = typer.Option(False, "--force", help="Recompute the comparison's cached method scores."),
    multirun: bool = typer.Option(False, "--multirun", "-m", help="Hydra multirun: sweep `key=a,b` overrides "
                                  "(full product); each run writes to <results>/<overrides>/. Jobs go through "
                                  "Hydra's launcher: add `hydra/launcher=joblib hydra.launcher.n_jobs=2` for "
                                  "processes, `hydra/launcher=submitit_slurm` for a cluster."),
    shards: int = typer.Option(1, "--shards", min=1, help="Compute the ground truth as N launcher jobs (shards "
                               "i/N, run by Hydra's launcher; see --multirun), check all finished, then compare."),
    per_point: bool = typer.Option(None, "--baselines/--no-baselines", help="Run the per-point baselines "
                                   "(influence function, TracIn, grad-dot). Default: all three for classifiers, TracIn and "
                                   "grad-dot for language models (whose influence function needs a Hessian-vector "
                                   "product over the training set per CG iteration). Skip the unrolled methods with "
                                   "`baselines.curvatures=[]`."),
) -> None:
    from dve_repro.compare import run_compare, run_sweep

    if shards > 1 or multirun:
        if shard:
            raise DveError("--shard i/n computes one shard by hand; --shards N runs all of them: give one of the two")
        from dve_repro.sweep import split_overrides

        target = None
        if not multirun:
            job = split_overrides(overrides or [])[1]
            target = _results(_setup(job), job, results, "compare")
        for out in run_sweep(overrides or [], shards=shards, results=results, force=force, per_point=per_point,
                             command="dve compare-tsloo", target=target):
            typer.echo(str(out))
        return
    job = overrides or []
    cfg = _setup(job)
    out = run_compare(cfg, _results(cfg, job, results, "compare"), force=force, shard=shard, per_point=per_point,
                      command=command_line("compare-tsloo", job))
    if out is None:
        typer.echo(f"ground-truth shard {shard} done; run the remaining shards, then rerun without --shard")
    else:
        typer.echo(str(out))


@app.command("decompose-projection", help="Issue 13: where the stored embedding loses fidelity. Scores DVEmb's "
             "recursion matrix-free for every curvature × projection (none, kronecker, kfac at each K_OUTxK_IN) "
             "× M (full, per layer) against ground-truth TSLOO (made or reused) and writes decomposition.csv, "
             ".md and .png to --results. " + OVERRIDE_HELP)
@guarded
def decompose_projection(
    overrides: list[str] = OverridesArg,
    results: Path = typer.Option(None, "--results", help=RESULTS_HELP.replace("<experiment>", "<experiment>/decomposition")),
    curvatures: str = typer.Option("ef,gn,mc", "--curvatures", help="Comma-separated: ef, gn, mc."),
    kinds: str = typer.Option("kronecker,kfac", "--kinds", help="Comma-separated projections: kronecker, kfac, pca, gradcov."),
    sizes: str = typer.Option("32x32,32x64,32x128,16x256,32x256,32x512", "--sizes",
                              help="Comma-separated per-layer sizes K_OUTxK_IN (capped at each layer's)."),
) -> None:
    from dve_repro.decompose import parse_sizes, run_decomposition

    cfg = _setup(overrides or [])
    out = _results(cfg, overrides, results, "decomposition", "decomposition")
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    typer.echo(str(run_decomposition(cfg, out, split(curvatures), split(kinds), parse_sizes(sizes),
                                     command=command_line("decompose-projection", overrides))))


@app.command(help="Map where the estimator can be trusted: sweep each `key=a,b,c` override alone (others "
             "fixed), run compare-tsloo for every value, and plot Spearman against each knob. " + OVERRIDE_HELP)
@guarded
def ablate(
    overrides: list[str] = OverridesArg,
    results: Path = typer.Option(None, "--results", help="Output folder (default: an ignored folder under "
                                 "runtime.out_root; `make ablate` writes the committed results/<experiment>/ablations)."),
) -> None:
    from dve_repro.ablate import run_ablation
    from dve_repro.sweep import split_overrides

    fixed = [o for o in split_overrides(overrides or [])[1] if "," not in o.split("=", 1)[-1]]
    cfg = _setup(fixed)
    # a sweep is always ad hoc: the committed map is written by `make ablate` (its --results)
    out = _results(cfg, ["ablate", *(overrides or [])], results, "ablate")
    typer.echo(str(run_ablation(overrides or [], out, command=command_line("ablate", overrides))))


@app.command("detect-mislabeled", help="E6: mislabeled-data detection with label noise. Trains and embeds "
             "when needed, values every training point by DVEmb and baselines (influence, TracIn, "
             "self-influence, gradient dot product, training loss), and writes AUROC / average precision "
             "tables and detection curves to results/<experiment>/. experiment=cifar10_noise reads CIFAR-10 "
             "from data.root; experiment=mnist_noise is the MNIST stand-in. " + OVERRIDE_HELP)
@guarded
def detect_mislabeled(
    overrides: list[str] = OverridesArg,
    results: Path = typer.Option(None, "--results", help=RESULTS_HELP),
    force: bool = typer.Option(False, "--force", help="Recompute the cached method values."),
) -> None:
    from dve_repro.detect import run_detect

    cfg = _setup(overrides or [])
    out = _results(cfg, overrides, results, "detect")
    typer.echo(str(run_detect(cfg, out, force=force, command=command_line("detect-mislabeled", overrides))))


@app.command(help="E5 (paper Fig. 1b): online data selection by gradient alignment with a validation batch, "
             "timed by the influence phases. Trains every select.schedules entry (never, always, early_late, early, "
             "late) for every select.seeds entry (reusing finished runs) and writes selection.{csv,md}, curves.png "
             "and gain_vs_cost.png to results/<experiment>/. A single selected run: "
             "`dve train select.schedule=early_late …`. " + OVERRIDE_HELP)
@guarded
def select(
    overrides: list[str] = OverridesArg,
    results: Path = typer.Option(None, "--results", help=RESULTS_HELP),
) -> None:
    from dve_repro.select import run_select

    cfg = _setup(overrides or [])
    out = _results(cfg, overrides, results, "select")
    typer.echo(str(run_select(overrides or [], out, command=command_line("select", overrides))))


bench_app = typer.Typer(help="Benchmarks: tables of measured throughput, memory and ratios → results/bench/.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _cpu_bench(name: str, help: str, quick_help: str) -> None:
    """Register ``dve bench <name>`` → ``dve_repro.bench.bench_<name>(out, quick=…)``; the four CPU
    benchmarks take the same two options."""

    def command(
        out: Path = typer.Option(Path("results/bench"), "--out", help=f"Folder for {name}.csv and {name}.md."),
        quick: bool = typer.Option(False, "--quick", help=quick_help),
    ) -> None:
        from dve_repro import bench

        getattr(bench, f"bench_{name}")(out, quick=quick)

    command.__name__ = f"bench_{name}"
    bench_app.command(name, help=help)(guarded(command))


_cpu_bench("embed", "Capture, Algorithm 1/2 and the recompute-at-θ_T alternative, side by side.",
           "One tiny configuration, one repeat.")
_cpu_bench("tsloo", "Batched ground-truth retraining against one retraining per point, from θ_0 and from the same "
           "checkpoint.", "A tiny run, one repeat.")
_cpu_bench("lm", "E2 on the CPU for pythia_tiny and pythia_14m: capture throughput and overhead, Algorithm 1 "
           "throughput and memory, storage, queries, recompute at θ_T.", "pythia_tiny only, short sequences, two repeats.")
_cpu_bench("adamw", "The AdamW-aware recursion (mask and Kronecker operators) against the SGD recursion at equal "
           "projection size: time per step, ratio, matrix memory, storage.", "One small size, one round.")


@bench_app.command("gpu", help="E2 on the real pipeline (paper Table 1): `dve train` with capture, `dve embed`, the "
                   "recompute-at-θ_T alternative and `dve score` for experiment=pythia410m_pile1pct; peak GPU memory "
                   "per stage; phases figure. Extra arguments are overrides (e.g. data.path=<Pile folder>).")
@guarded
def bench_gpu(
    overrides: list[str] = typer.Argument(None, help="Overrides on top of experiment=pythia410m_pile1pct.",
                                          show_default=False),
    out: Path = typer.Option(Path("results/bench"), "--out", help="Folder for gpu.csv, gpu.md and phases/."),
    steps: int = typer.Option(8, "--steps", help="Training steps to capture and embed."),
    device: str = typer.Option("cuda", "--device", help="cuda (the benchmark), or cpu for a dry run."),
) -> None:
    from dve_repro.bench import bench_gpu as run
    from dve_repro.tasks import resolve_device

    if steps < 2:
        raise DveError(f"--steps must be >= 2 (got {steps})")
    run(out, list(overrides or []), steps=steps, device=resolve_device(device))


analyze_app = typer.Typer(help="Language-model analyses (E3, E4) from an embedding run → results/<experiment>/.",
                          no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")

_COMPUTE_HELP = "Train and embed when missing (default); --no-compute gives a one-line error naming the command."


def _analysis(name: str, help: str) -> None:
    """Register ``dve analyze <name>`` → ``dve_repro.analyze.run_<name>``; both analyses take the
    same overrides and options."""

    def command(
        overrides: list[str] = OverridesArg,
        results: Path = typer.Option(None, "--results", help=RESULTS_HELP),
        compute: bool = typer.Option(True, "--compute/--no-compute", help=_COMPUTE_HELP),
    ) -> None:
        from dve_repro import analyze

        cfg = _setup(overrides or [])
        out = _results(cfg, overrides, results, name)
        typer.echo(str(getattr(analyze, f"run_{name}")(cfg, overrides or [], out, compute=compute,
                                                       command=command_line(f"analyze {name}", overrides))))

    command.__name__ = f"analyze_{name}"
    analyze_app.command(name, help=help + " " + OVERRIDE_HELP)(guarded(command))


_analysis("phases", "E3 (paper Fig. 1a): per training step, the mean influence of its batch on the final validation "
          "loss divided by η_t, with warm-up / basin / late regions and their ratios → phases.{csv,md,png,pdf}.")
_analysis("dynamics", "E4 (paper Fig. 4): influence of the early / middle / late thirds of training points on every "
          "segment-boundary checkpoint, from Algorithm 2 (embed.algorithm=2) → dynamics.{csv,png,pdf}.")


@app.command(help="Every experiment this machine can run, --jobs stages at a time, each on one torch thread (E1, E1 with AdamW, E6, E3, E4, "
             "the LM fidelity checks, E5, the CPU rows of Table 1), reusing finished work; one line per stage with "
             "its time; then `dve report`. A failed stage does not stop the others (exit 1 at the end).")
@guarded
def reproduce(
    results_root: Path = typer.Option(Path("results"), "--results-root",
                                      help="Where the small results go (the committed results/ by default)."),
    out_root: Path = typer.Option(None, "--out-root", help="Run folders (default: each experiment's runtime.out_root, "
                                  "results/runs)."),
    profile: str = typer.Option("full", "--profile", help="full (as committed) or tiny (seconds; needs "
                                "--results-root other than results/)."),
    only: str = typer.Option(None, "--only", help="Comma-separated stage names (see --dry-run)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stages and their commands; run nothing."),
    jobs: int = typer.Option(2, "--jobs", "-j", help="Stages run side by side (each on one torch thread; a "
                             "benchmark runs alone)."),
) -> None:
    from dve_repro.reproduce import run_reproduce

    readme = Path("README.md") if Path(results_root) == Path("results") and Path("README.md").exists() else None
    failed = run_reproduce(profile, results_root, out_root, only.split(",") if only else None, dry_run=dry_run,
                           echo=typer.echo, readme=readme, jobs=jobs)
    if failed:
        raise typer.Exit(1)


@app.command(help="Write REPORT.md from the committed small results alone (no recomputation): per paper claim, the "
             "paper's number, ours, the verdict by the rules in its header, the command and the figure.")
@guarded
def report(
    results_root: Path = typer.Option(Path("results"), "--results-root", help="Folder of the small results."),
    out: Path = typer.Option(None, "--out", help="Report file (default <results-root>/REPORT.md)."),
    readme: Path = typer.Option(None, "--readme", help="Also refresh the results table of this README (default "
                                "README.md when --results-root is results/)."),
) -> None:
    from dve_repro.report import write_report

    if not Path(results_root).is_dir():
        raise DveError(f"{results_root} is not a folder of results")
    if readme is None and Path(results_root) == Path("results") and Path("README.md").exists():
        readme = Path("README.md")
    typer.echo(str(write_report(results_root, out, readme)))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if _ranks() > 1:  # leave torchrun's process group (it was joined by the stage)
            from dve_repro import distributed

            distributed.shutdown()


if __name__ == "__main__":
    main()
