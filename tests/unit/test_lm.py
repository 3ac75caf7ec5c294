"""The GPT-NeoX model stage: configs, seeded builds, parameter counts, loss, linear layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from dve_repro import config as config_mod
from dve_repro.config import GPTNeoXModelConfig, TextDataConfig
from dve_repro.errors import DveError
from dve_repro.lm import (
    CAPTURE_LAYERS,
    build_gpt_neox,
    count_parameters,
    linear_layers,
    lm_loss_from_logits,
)

MODEL_DIR = config_mod.config_dir() / "model"
DATA_DIR = config_mod.config_dir() / "data"


def _model_cfg(name: str) -> GPTNeoXModelConfig:
    return GPTNeoXModelConfig(**OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml")))


@pytest.fixture(scope="module")
def tiny():
    return build_gpt_neox(_model_cfg("pythia_tiny"))


@pytest.mark.parametrize("name", ["pythia_tiny", "pythia_14m", "pythia_410m"])
def test_model_yaml_sets_every_field(name):
    raw = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / f"{name}.yaml"))
    assert set(raw) == {f.name for f in dataclasses.fields(GPTNeoXModelConfig)}
    assert raw["name"] == "gpt_neox" and raw["preset"] == name


@pytest.mark.parametrize("name", ["text", "pile"])
def test_data_yaml_sets_every_field(name):
    raw = OmegaConf.to_container(OmegaConf.load(DATA_DIR / f"{name}.yaml"))
    assert set(raw) == {f.name for f in dataclasses.fields(TextDataConfig)}


def test_text_and_tiny_model_compose():
    cfg = config_mod.compose(["data=text", "model=pythia_tiny"])
    assert isinstance(cfg.data, TextDataConfig) and cfg.data.seq_len == 128
    assert isinstance(cfg.model, GPTNeoXModelConfig) and cfg.model.preset == "pythia_tiny"


def test_tiny_model_builds_and_trains_one_step(tiny):
    cfg = _model_cfg("pythia_tiny")
    assert count_parameters(tiny) == cfg.expected_parameters
    assert tiny.config._attn_implementation == "eager"
    assert tiny.gpt_neox.layers[0].attention.rotary_ndims == 4  # 25% of the 16 head dims
    assert tiny.lm_head.weight.data_ptr() != tiny.gpt_neox.embed_in.weight.data_ptr()  # untied
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = lm_loss_from_logits(tiny(input_ids=ids).logits, ids)
    assert losses.shape == (2,)
    assert torch.allclose(losses.mean(), tiny(input_ids=ids, labels=ids).loss, atol=1e-6)
    assert abs(losses.mean().item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5
    losses.sum().backward()
    assert all(p.grad is not None for p in tiny.parameters())
    tiny.zero_grad()


def test_loss_per_sequence_is_per_sequence(tiny):
    ids = torch.randint(0, 50304, (3, 12), generator=torch.Generator().manual_seed(1))
    batch = lm_loss_from_logits(tiny(input_ids=ids).logits, ids)
    one = torch.stack([lm_loss_from_logits(tiny(input_ids=ids[i : i + 1]).logits, ids[i : i + 1])[0]
                       for i in range(3)])
    assert torch.allclose(batch, one, atol=1e-5)


def test_seed_fixes_the_initialisation_and_leaves_the_global_rng_alone():
    cfg = _model_cfg("pythia_tiny")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_gpt_neox(cfg)
    assert torch.equal(torch.rand(1), before)
    b = build_gpt_neox(cfg)
    c = build_gpt_neox(dataclasses.replace(cfg, init_seed=1))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.gpt_neox.embed_in.weight, c.gpt_neox.embed_in.weight)
    assert build_gpt_neox(cfg, dtype=torch.float64).lm_head.weight.dtype == torch.float64


def test_parameter_count_mismatch_is_a_one_line_error():
    cfg = dataclasses.replace(_model_cfg("pythia_tiny"), expected_parameters=123)
    with pytest.raises(
        DveError,
        match=r"^model pythia_tiny has 6,539,008 parameters but model.expected_parameters=123;",
    ) as exc:
        build_gpt_neox(cfg)
    assert "\n" not in str(exc.value)


def test_pythia_14m_parameter_count_matches_its_yaml():
    cfg = _model_cfg("pythia_14m")
    assert cfg.expected_parameters == 14_067_712
    assert count_parameters(build_gpt_neox(cfg)) == cfg.expected_parameters


def test_linear_layers(tiny):
    layers, desc = linear_layers(tiny, "all")
    names = [n for n, _ in layers]
    per_block = [
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ]
    assert names == [f"gpt_neox.layers.{i}.{s}" for i in range(2) for s in per_block]
    assert all(isinstance(m, torch.nn.Linear) for _, m in layers)
    for left_out in (
        "gpt_neox.embed_in",
        "lm_head",
        "layers.*.input_layernorm",
        "gpt_neox.final_layer_norm",
    ):
        assert left_out in desc
    mlp, mlp_desc = linear_layers(tiny, "mlp")
    assert [n for n, _ in mlp] == [n for n in names if ".mlp." in n]
    assert "layers.*.attention.query_key_value" in mlp_desc
    covered = sum(p.numel() for _, m in layers for p in m.parameters())
    assert f"{covered:,} of {count_parameters(tiny):,}" in desc
    with pytest.raises(DveError):
        linear_layers(tiny, "attention")
    # every option the config accepts is one linear_layers knows, and the reverse
    assert tuple(CAPTURE_LAYERS) == config_mod.LM_CAPTURE_LAYERS
    full, full_desc = linear_layers(tiny, "all+head+embed")
    assert [n for n, _ in full] == ["gpt_neox.embed_in", *names, "lm_head"]
    assert "left out: layers.*.input_layernorm" in full_desc


@pytest.mark.slow
def test_pythia_410m_has_405334016_parameters():
    model = build_gpt_neox(_model_cfg("pythia_410m"))
    assert count_parameters(model) == 405_334_016
