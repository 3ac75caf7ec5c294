"""CUDA agrees with the CPU on the per-sample gradients and projections that every estimate
is built from (float64, so the two devices differ by rounding only). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from dve_repro.capture import Featurizer
from dve_repro.config import MLPConfig, ProjectionConfig
from dve_repro.grads import gradient_layout
from dve_repro.models import build_model
from dve_repro.projection import Projector
from dve_repro.tasks import Task

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# float64 on both devices; cuBLAS and the CPU sum in other orders (~1e-16 relative).
DEVICE_RTOL = 1e-10


def _task(device: str) -> Task:
    model = build_model(
        MLPConfig(in_features=6, hidden=[5], n_classes=3, activation="tanh", init_seed=1)
    ).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 3, (9,), generator=gen).to(device)
    return Task("classify", model, x, y, x[:2], y[:2], 3, "device check")


@pytest.mark.parametrize("engine", ["hooks", "func"])
@pytest.mark.parametrize("kind", ["none", "kronecker", "dense"])
def test_per_sample_gradients_agree_between_cpu_and_cuda(engine, kind):
    rows = {}
    for device in ("cpu", "cuda"):
        task = _task(device)
        blocks = gradient_layout(task.model)
        proj = Projector(ProjectionConfig(kind=kind, dim=16, k_in=4, k_out=2, seed=3), blocks)
        feat = Featurizer(task, blocks, proj, engine)
        params = {k: v.detach() for k, v in task.model.named_parameters()}
        rows[device] = feat.features(params, task.x_train, task.y_train).cpu()
    assert rows["cpu"].abs().max() > 0
    torch.testing.assert_close(rows["cuda"], rows["cpu"], rtol=DEVICE_RTOL, atol=1e-14)
