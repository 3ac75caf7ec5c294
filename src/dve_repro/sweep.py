"""Sweeps and ground-truth shards through Hydra's sweeper and launcher plugins.

``dve compare-tsloo -m key=a,b …``, ``dve compare-tsloo --shards N …`` and ``dve ablate``
hand their jobs to Hydra's multirun machinery — the same path ``@hydra.main`` takes for
``-m`` — so the engine is a config choice, not dve code:

* ``hydra/launcher=basic`` (the default): one job after another in this process;
* ``hydra/launcher=joblib hydra.launcher.n_jobs=4``: processes on this machine
  (``hydra-joblib-launcher``);
* ``hydra/launcher=submitit_slurm hydra.launcher.partition=…``: a SLURM array
  (``hydra-submitit-launcher``, installed separately).

Every override that starts with ``hydra`` goes to Hydra; the rest are the job's. Hydra's
own files (``multirun.yaml``, each job's folder) go under ``<out_root>/<name>/sweeps/``,
never into the working directory. A job is a picklable callable ``job(overrides) ->
value`` (launchers ship it to other processes or machines); :func:`launch` returns the
values in job order; every job runs, and one line then names each that failed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dve_repro.errors import ConfigError, DveError


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra's own overrides, the job's): ``hydra/launcher=joblib``, ``hydra.launcher.n_jobs=2``
    go to Hydra."""
    ours = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
    return ours, [o for o in overrides if o not in ours]


class _Task:
    """What Hydra calls per job: ``job(overrides)`` with the job's own overrides as Hydra
    expanded them from the sweep, or ``job(overrides, items[i])`` for the job Hydra's
    ``+dve_job=i`` names. A plain class so that launchers can pickle it."""

    def __init__(self, job: Callable[..., Any], items: list[Any] | None):
        self.job, self.items = job, items

    def __call__(self, _cfg) -> Any:
        from hydra.core.hydra_config import HydraConfig

        overrides, i = _decode(list(HydraConfig.get().overrides.task))
        try:
            return self.job(overrides) if self.items is None else self.job(overrides, self.items[i])
        except Exception as exc:  # kept, not raised: Hydra's sweeper would stop at the first failure
            kind = "" if isinstance(exc, DveError) else f"{type(exc).__name__}: "
            return _Failed(kind + _first_line(exc))


class _Failed:
    """A job's failure, returned through the launcher so that every job runs and all are named."""

    def __init__(self, message: str):
        self.message = message


def _decode(overrides: list[str]) -> tuple[list[str], int]:
    picked = [o for o in overrides if o.startswith(_ITEM)]
    return [o for o in overrides if not o.startswith(_ITEM)], int(picked[0].split("=", 1)[1]) if picked else -1


_ITEM = "+dve_job="


def launch(overrides: Sequence[str], job: Callable[..., Any], sweep_root: Path,
           items: Sequence[Any] | None = None) -> list[tuple[list[str], Any, Any]]:
    """Run ``job`` for every point of the sweep through the configured launcher.

    Without ``items``: ``job(overrides)`` for every point of ``key=a,b`` sweeps (full
    product, as Hydra's basic sweeper expands them). With ``items`` (an explicit job list,
    e.g. one entry per ground-truth shard or per ablation value): ``job(overrides, item)``
    for each — Hydra sweeps a choice ``+dve_job=0,…,n−1`` that selects the item. Returns
    ``[(job overrides, item or None, value)]`` in job order."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobStatus

    from dve_repro.config import _explain, config_dir

    hydra_ov, job_ov = split_overrides(overrides)
    Path(sweep_root).mkdir(parents=True, exist_ok=True)
    sweep_dir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=sweep_root))  # one per launch
    base = [f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}", "hydra.job.chdir=false",
            "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    listed = list(items) if items is not None else None
    if listed is not None:
        if not listed:
            return []
        job_ov = [*job_ov, _ITEM + ",".join(str(i) for i in range(len(listed)))]
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="dve", config_search_path=create_config_search_path(str(config_dir())))
        try:
            batches = hydra.multirun(config_name="config", task_function=_Task(job, listed),
                                     overrides=[*base, *hydra_ov, *job_ov], with_log_configuration=False)
        except DveError:
            raise
        except Exception as exc:  # Hydra's errors for a bad override or an unknown launcher
            raise ConfigError(f"cannot launch the sweep: {_hydra_group_error(exc) or _explain(exc, config_dir())}") from None
    finally:
        GlobalHydra.instance().clear()
    results, failed = [], []
    for ret in (r for batch in batches for r in batch):
        ov, i = _decode(list(ret.overrides))
        item = listed[i] if listed is not None else None
        value = ret.return_value if ret.status == JobStatus.COMPLETED else _Failed(_first_line(ret._return_value))
        if isinstance(value, _Failed):
            failed.append(f"[{' '.join(ov) if listed is None else item}]: {value.message}")
        else:
            results.append((ov, item, value))
    if failed:
        raise DveError(f"{len(failed)} of {len(failed) + len(results)} sweep jobs failed: " + "; ".join(failed))
    return results


def _first_line(exc: Any) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()[:300]


def _hydra_group_error(exc: Exception) -> str:
    """"unknown hydra/launcher 'x' (installed: basic, joblib)" for an option of one of Hydra's
    own groups that is not installed; "" for any other error."""
    import re

    text = str(exc)
    missing = re.search(r"Could not find '(hydra/[\w/]+)/([^'/]+)'", text)
    if not missing:
        return ""
    group, option = missing.groups()
    block = text.split(f"Available options in '{group}':", 1)
    options = re.findall(r"^\t(\S+)$", block[1].split("Config search path", 1)[0], flags=re.M) if len(block) > 1 else []
    hint = f" (installed: {', '.join(options)})" if options else ""
    extra = "; hydra-submitit-launcher adds submitit_local and submitit_slurm" if group == "hydra/launcher" else ""
    return f"unknown {group} {option!r}{hint}{extra}"
