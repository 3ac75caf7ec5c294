"""The ``dve`` command line (Typer). Every command takes Hydra-style overrides.

Errors a user can cause are printed as one line (``error: …``) with exit code 2; an
interrupted command exits 130 and resumes when rerun.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer

from dve_repro.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, DveError

OVERRIDE_HELP = (
    "Hydra-style overrides, e.g. `experiment=mnist_mlp optim.lr=0.05 trajectory.checkpoint_every=1`. "
    "Pick a group option with `group=option` (data, model, optim, schedule, projection, ...), set a "
    "value with `key=value`, a list with `key=[a,b]`."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dve — data value embeddings (Wang et al., ICLR 2025) and their check against retraining.",
    pretty_exceptions_enable=False,
)


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

    return wrapper


def _setup(overrides: list[str]):
    from dve_repro import ui
    from dve_repro.config import compose

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    cfg = compose(overrides)
    ui.set_enabled(cfg.runtime.progress)
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

    cfg = _setup(overrides or [])
    path = run_training(cfg, force=force)
    typer.echo(str(path))


# The help of `train` lists the experiments (computed at import so --help shows it).
train.__doc__ = None
app.registered_commands[-1].help = (
    "Train a model and record its exact trajectory (batch indices, learning rates, checkpoints, "
    "optionally projected per-sample gradients).\n\n" + OVERRIDE_HELP + "\n\n" + _experiments_help()
)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
