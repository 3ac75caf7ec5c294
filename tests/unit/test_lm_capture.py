"""LM gradient capture (issue 5): hooks on GPT-NeoX's block linears fire under
``torch.func.functional_call``, and the rows captured inside a training step equal the
``torch.func`` per-sample gradients (and one-at-a-time autograd) projected the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dve_repro.capture import Featurizer
from dve_repro.config import GPTNeoXModelConfig, OptimConfig, ProjectionConfig, compose
from dve_repro.grads import gradient_layout, per_sample_grads_naive
from dve_repro.lm import build_gpt_neox, linear_layers
from dve_repro.optim import init_state
from dve_repro.projection import Projector
from dve_repro.tasks import Task
from dve_repro.train import _TrainCapture, train_step

VOCAB, SEQ, B = 61, 9, 5
# float64 model, but GPT-NeoX's eager attention takes its softmax in float32: a 1e-16 change
# of summation order (batched vs one sequence) can flip one float32 ulp there, so rows agree
# to ~1e-9 relative, not 1e-15. A wrong factor, projection or scaling is off by O(1).
RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module", params=["all", "all+head", "all+head+embed"])
def task(request) -> Task:
    cfg = GPTNeoXModelConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32, init_seed=1)
    model = build_gpt_neox(cfg, torch.float64)
    layers, left_out = linear_layers(model, request.param)
    ids = torch.randint(0, VOCAB, (B + 2, SEQ), generator=torch.Generator().manual_seed(0))
    return Task("lm", model, ids[:B], ids[:B], ids[B:], ids[B:], VOCAB, "random tokens",
                extra={"capture_layers": [n for n, _ in layers], "left_out": left_out})


class _Rows:
    """A stand-in for GradientStore that keeps what the capture writes."""

    def __init__(self):
        self.rows: dict[int, torch.Tensor] = {}

    def write(self, t, rows, curv=None, start=0, whole=True):
        self.rows[t] = rows.detach().clone()


def _featurizer(task: Task, engine: str, kind: str = "kronecker") -> Featurizer:
    blocks = gradient_layout(task.model, task.extra["capture_layers"])
    proj = Projector(ProjectionConfig(kind=kind, k_in=4, k_out=3, seed=7), blocks)
    return Featurizer(task, blocks, proj, engine)


def test_left_out_names_embeddings_norms_and_head(task):
    left = task.extra["left_out"].split("left out:")[1]
    layers = task.extra["capture_layers"]
    with_head, with_embed = "lm_head" in layers, "gpt_neox.embed_in" in layers
    assert "layernorm" in left, left
    assert ("lm_head" in left) != with_head and ("embed_in" in left) != with_embed
    assert len(layers) == 8 + with_head + with_embed  # 4 linears × 2 blocks (+ head, embedding)


def test_training_capture_equals_func_and_naive_per_sample_gradients(task):
    params = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    x, y = task.x_train, task.y_train
    w = torch.full((B,), 1.0 / B, dtype=torch.float64)
    hooks = _featurizer(task, "hooks")
    assert hooks.engine == "hooks"
    store = _Rows()
    cfg = compose(["data=text", "model=pythia_tiny", "optim=adamw"])
    cfg.optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, grad_clip=1.0)
    state = init_state(params, cfg.optim)
    cap = _TrainCapture(hooks, store, "ef", 1, 0)
    new_p, _, losses = cap.step(task, params, state, 0, x, y, w, 1e-3, cfg)
    cap.store.flush()  # rows go through the background writer
    captured = store.rows[0]
    assert captured.shape == (B, hooks.projector.out_dim) and captured.abs().sum() > 0

    # The capture does not change the step: same parameters as a step without hooks.
    ref_p, _, ref_losses = train_step(task, params, state, 0, x, y, w, 1e-3, cfg)
    assert all(torch.equal(new_p[k], ref_p[k]) for k in ref_p)
    assert torch.equal(losses, ref_losses)

    func = _featurizer(task, "func")
    rows_func = func.features(params, x, y)
    torch.testing.assert_close(captured, rows_func, rtol=RTOL, atol=ATOL)

    naive = per_sample_grads_naive(task.per_sample_loss, params, x, y, hooks.blocks)
    rows_naive = hooks.projector.project_blocks(naive)
    torch.testing.assert_close(captured, rows_naive, rtol=RTOL, atol=ATOL)


def test_unprojected_hooks_match_naive_exactly_in_layout(task):
    params = {k: v.detach().clone() for k, v in task.model.named_parameters()}
    feat = _featurizer(task, "hooks", kind="none")
    rows = feat.features(params, task.x_train, task.y_train)
    naive = per_sample_grads_naive(task.per_sample_loss, params, task.x_train, task.y_train, feat.blocks)
    torch.testing.assert_close(rows, feat.projector.project_blocks(naive), rtol=RTOL, atol=ATOL)
    assert rows.shape[1] == sum(b.size for b in feat.blocks)
    assert np.isfinite(rows.numpy()).all()


def test_bfloat16_autocast_step_keeps_float32_weights_and_captures(task):
    params = {k: v.detach().to(torch.float32) for k, v in task.model.named_parameters()}
    model32 = build_gpt_neox(GPTNeoXModelConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=32, init_seed=1), torch.float32)
    t32 = Task("lm", model32, task.x_train, task.y_train, task.x_val, task.y_val, VOCAB, "random tokens",
               extra=task.extra)
    cfg = compose(["data=text", "model=pythia_tiny", "optim=adamw", "train.dtype=bfloat16"])
    w = torch.full((B,), 1.0 / B)
    store = _Rows()
    cap = _TrainCapture(_featurizer(t32, "hooks"), store, "ef", 1, 0)
    new_p, _, losses = cap.step(t32, params, init_state(params, cfg.optim), 0, t32.x_train, t32.y_train, w, 1e-3, cfg)
    cap.store.flush()  # rows go through the background writer
    assert all(v.dtype == torch.float32 for v in new_p.values())
    assert store.rows[0].dtype == torch.float32 and torch.isfinite(store.rows[0]).all()
    exact = _featurizer(t32, "func").features(params, t32.x_train, t32.y_train)
    rel = (store.rows[0] - exact).norm() / exact.norm()
    assert rel < 0.05, f"bf16 capture is {rel:.3f} away (relative) from the float32 rows"
    assert torch.isfinite(losses).all()
