"""Model builders from config: the MNIST MLP and a small CNN (the LMs live in ``lm.py``).

Every initialisation value is in the config (``model.init_seed``, ``model.init``); models
are built on the CPU in float64 or float32 and moved by the caller.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dve_repro.config import CNNConfig, MLPConfig

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Module):
    """``in_features → hidden[0] → … → n_classes`` with the configured activation.

    Input [B, in_features] (images are flattened by the caller or here), output logits [B, C].
    """

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        sizes = [cfg.in_features, *cfg.hidden, cfg.n_classes]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[cfg.activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Two conv blocks (conv 3×3 → activation → 2×2 max-pool) and a two-layer head."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        act = ACTIVATIONS[cfg.activation]
        blocks: list[nn.Module] = []
        c_in, size = cfg.in_channels, cfg.image_size
        for c in cfg.channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), act(), nn.MaxPool2d(2)]
            c_in, size = c, size // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * size * size, cfg.hidden), act(), nn.Linear(cfg.hidden, cfg.n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: MLPConfig | CNNConfig, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Build a classifier with a seeded initialisation (torch's default layer init)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.init_seed)
    try:
        model = MLP(cfg) if isinstance(cfg, MLPConfig) else CNN(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)
