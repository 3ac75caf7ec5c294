"""Configuration: every experiment and group option composes and validates; bad overrides fail
in one line; fingerprints follow what changes a result and nothing else."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from dve_repro.config import (
    Config,
    ImageDataConfig,
    MLPConfig,
    compose,
    config_dir,
    fingerprint,
    from_dict,
    list_experiments,
    stage_payload,
    to_dict,
    validate,
)
from dve_repro.errors import ConfigError, DveError


def test_experiments_are_listed():
    names = list_experiments()
    assert {"mnist_mlp", "tiny_mlp"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_experiments())
def test_every_experiment_composes_and_validates(name):
    cfg = compose([f"experiment={name}"])
    assert isinstance(cfg, Config)
    assert cfg.name == name, f"configs/experiment/{name}.yaml sets name={cfg.name!r}"
    validate(cfg)
    for field in dataclasses.fields(cfg):  # no section is left as a raw dict / DictConfig
        value = getattr(cfg, field.name)
        assert dataclasses.is_dataclass(value) or isinstance(value, int | str), field.name
    # The resolved config round-trips through its saved form (config.json).
    assert from_dict(to_dict(cfg)) == cfg
    fingerprint(stage_payload(cfg, "train"))


def test_float64_experiments_keep_float64_rows():
    """Rows are stored in float32 unless an experiment pins float64: every float64 experiment
    (the oracles compared with retraining) pins it, so its runs keep their fingerprints and
    numbers; the float32 / bf16 ones store float32."""
    from dve_repro.config import EmbedConfig

    assert EmbedConfig().storage_dtype == "float32"
    for name in list_experiments():
        cfg = compose([f"experiment={name}"])
        want = "float64" if cfg.train.dtype == "float64" else "float32"
        assert cfg.embed.storage_dtype == want, f"experiment={name}: train.dtype={cfg.train.dtype} " \
                                                f"but embed.storage_dtype={cfg.embed.storage_dtype}"


def test_captured_rows_dtype_is_part_of_the_training_run():
    """The rows written during training are its output: their dtype keys the run folder
    (float64, the dtype of every run before float32 became the default, adds nothing)."""
    cap = compose(["experiment=tiny_mlp", "trajectory.capture=true"])
    f64 = fingerprint(stage_payload(cap, "train"))
    f32 = fingerprint(stage_payload(compose(["experiment=tiny_mlp", "trajectory.capture=true",
                                             "embed.storage_dtype=float32"]), "train"))
    assert f64 != f32
    assert "capture_storage_dtype" not in stage_payload(cap, "train")
    plain = compose(["experiment=tiny_mlp", "embed.storage_dtype=float32"])  # nothing captured: no key
    assert fingerprint(stage_payload(plain, "train")) == fingerprint(stage_payload(compose(["experiment=tiny_mlp"]),
                                                                                    "train"))


def _default_options() -> dict[str, str]:
    """``group: option`` pairs of the root config's defaults list."""
    import yaml

    defaults = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}


# Each option that is not a default, composed on its own (defaults are composed by every test).
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in config_dir().iterdir()
    if group.is_dir() and group.name != "experiment"
    for option in group.glob("*.yaml")
    if _default_options().get(group.name) != option.stem
)


def test_every_default_option_exists():
    for group, option in _default_options().items():
        assert (config_dir() / group / f"{option}.yaml").is_file(), f"{group}={option}"


def _experiments_overriding(group: str) -> list[str]:
    """Experiments whose defaults list picks an option of ``group`` (``override /group: …``)."""
    import yaml

    out = []
    for name in list_experiments():
        doc = yaml.safe_load((config_dir() / "experiment" / f"{name}.yaml").read_text()) or {}
        keys = {k for d in doc.get("defaults", []) if isinstance(d, dict) for k in d}
        if f"override /{group}" in keys:
            out.append(name)
    return out


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option):
    """On top of the defaults, or, when it needs other groups to change too (a language model
    needs text data), on top of an experiment that changes the same group."""
    try:
        validate(compose([f"{group}={option}"]))
        return
    except ConfigError as exc:
        first_error = exc
    for name in _experiments_overriding(group):
        try:
            validate(compose([f"experiment={name}", f"{group}={option}"]))
            return
        except ConfigError:
            continue
    raise first_error


def test_defaults_are_the_paper_e1_setting():
    cfg = compose([])
    assert cfg.name == "mnist_mlp"
    assert isinstance(cfg.data, ImageDataConfig) and isinstance(cfg.model, MLPConfig)
    assert (cfg.data.n_train, cfg.data.n_val, cfg.data.n_test) == (4000, 500, 500)
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0 and cfg.train.dtype == "float64"


def test_overrides_reach_the_dataclasses():
    cfg = compose(
        [
            "experiment=tiny_mlp",
            "optim=adamw",
            "optim.lr=0.02",
            "model.hidden=[4,3]",
            "train.dtype=float32",
            "data.label_noise=0.2",
        ]
    )
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.02 and cfg.optim.grad_clip == 1.0
    assert cfg.model.hidden == [4, 3] and cfg.train.dtype == "float32"
    assert cfg.data.label_noise == 0.2 and cfg.data.n_train == 256  # experiment values kept


@pytest.mark.parametrize(
    "override, expected",
    [
        ("foo=1", "foo"),
        ("+foo=1", "foo"),
        ("data=nope", "nope"),
        ("optim.lr=abc", "optim.lr: Value 'abc'"),
        ("optim.lr=-0.1", "optim.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.label_noise=1.0", "data.label_noise"),
        ("optim.momentum=1.0", "optim.momentum"),
        ("train.dtype=float16", "train.dtype"),
        ("train.batch_size=1.5", "train.batch_size: Value '1.5'"),
        ("model.hidden=[0]", "model.hidden"),
    ],
)
def test_bad_overrides_fail_in_one_line(override, expected):
    with pytest.raises(ConfigError) as info:
        compose(["experiment=tiny_mlp", override])
    msg = str(info.value)
    assert issubclass(ConfigError, DveError)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    assert expected in msg, f"{override}: the message does not name it: {msg!r}"


def test_from_dict_refuses_unknown_sections_and_names():
    good = to_dict(compose(["experiment=tiny_mlp"]))
    for mutate in (
        lambda d: d["data"].update(name="imagenet"),
        lambda d: d["model"].update(name="resnet"),
        lambda d: d["optim"].update(nesterov=True),
        lambda d: d.update(extra_section={}),
    ):
        bad = to_dict(from_dict(good))
        mutate(bad)
        with pytest.raises(ConfigError):
            from_dict(bad)


def _with(cfg: Config, **changes) -> Config:
    """A copy of ``cfg`` with ``section__field=value`` changes."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, name = key.split("__")
        assert hasattr(getattr(out, section), name), f"no field {section}.{name}"
        setattr(getattr(out, section), name, value)
    return out


def test_fingerprint_follows_results_not_speed():
    base = compose(["experiment=tiny_mlp"])
    fp = fingerprint(stage_payload(base, "train"))
    same = [
        {"runtime__out_root": "/elsewhere"},
        {"runtime__threads": 3},
        {"runtime__progress": False},
        {"runtime__device": "auto"},
        {"embed__workers": 2},
        {"tsloo__chunk_size": 7},
        {"embed__blocks": "layer"},
        {"projection__dim": 7},
    ]
    for change in same:
        assert fingerprint(stage_payload(_with(base, **change), "train")) == fp, (
            f"{change} changed it"
        )
    different = [
        {"optim__lr": 0.05},
        {"train__order_seed": 1},
        {"model__init_seed": 1},
        {"data__split_seed": 1},
        {"train__dtype": "float32"},
        {"trajectory__checkpoint_every": 2},
        {"data__label_noise": 0.1},
        {"schedule__kind": "cosine"},
        {"optim__momentum": 0.5},
    ]
    for change in different:
        assert fingerprint(stage_payload(_with(base, **change), "train")) != fp, f"{change} did not"
    # Captured gradients are outputs of training: then the projection is part of its identity.
    cap = _with(base, trajectory__capture=True)
    assert fingerprint(stage_payload(_with(cap, projection__dim=7), "train")) != fingerprint(
        stage_payload(cap, "train")
    )
    # The embedding stage depends on its own section too; speed-only fields stay out.
    emb = fingerprint(stage_payload(base, "embed"))
    assert fingerprint(stage_payload(_with(base, embed__blocks="layer"), "embed")) != emb
    assert fingerprint(stage_payload(_with(base, embed__chunk_steps=1), "embed")) == emb
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_ground_truth_identity_ignores_what_is_captured():
    base = compose(["experiment=pythia_tiny_sgd", "trajectory.capture=false"])
    fp = {stage: fingerprint(stage_payload(base, stage)) for stage in ("train", "embed", "tsloo")}
    # Without capture the layers DVEmb sees do not touch training, only the embedding stage.
    heads = _with(base, model__capture_layers="all+head")
    assert fingerprint(stage_payload(heads, "train")) == fp["train"]
    assert fingerprint(stage_payload(heads, "embed")) != fp["embed"]
    # With capture they are outputs of training; the trajectory, and so the ground truth, is unchanged.
    cap = _with(base, trajectory__capture=True)
    assert fingerprint(stage_payload(cap, "train")) != fp["train"]
    assert fingerprint(stage_payload(_with(cap, model__capture_layers="all+head"), "train")) != fingerprint(
        stage_payload(cap, "train"))
    for changed in (cap, _with(cap, model__capture_layers="all+head"), _with(cap, projection__k_in=4)):
        assert fingerprint(stage_payload(changed, "tsloo")) == fp["tsloo"]
    assert fingerprint(stage_payload(_with(base, optim__lr=0.5), "tsloo")) != fp["tsloo"]


def test_missing_config_folder_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("DVE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        compose([])
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
