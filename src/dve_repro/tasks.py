"""A *task* binds a dataset to a model and a per-sample loss.

Every later stage (training, replay, capture, scoring, retraining, baselines) talks to a
model only through :class:`Task`: ``batch(indices)`` fetches inputs and targets by training
index, ``per_sample_loss(params, x, y)`` returns one loss per sample ``[B]`` through
``torch.func.functional_call`` (so parameters are plain tensors that can be replaced,
stacked or differentiated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dve_repro.config import Config, ImageDataConfig, torch_dtype
from dve_repro.lm import build_gpt_neox, corrupt_sequences, linear_layers, lm_loss_from_logits


def logits_of(out) -> torch.Tensor:
    """The logits of a model's output: a Hugging Face output's ``.logits``, else the tensor."""
    return out.logits if hasattr(out, "logits") else out


def mc_step_seed(mc_seed: int, t: int) -> int:
    """Seed of step t's Monte-Carlo Fisher label draws (``embed.mc_seed``): the same draws in
    capture, replay, the AdamW embedding, the unrolled methods and the decomposition."""
    return mc_seed * 1_000_003 + t


@dataclass
class Task:
    kind: str  # classify | lm
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int
    description: str
    extra: dict = field(default_factory=dict)  # e.g. noisy indices, text fingerprint

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of per-sample loss weights: the parameters' dtype (float32 under autocast)."""
        p = next(self.model.parameters())
        return p.dtype if p.dtype != torch.bfloat16 else torch.float32

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the model (and so every batch) lives: the run's device."""
        return next(self.model.parameters()).device

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of training indices ``idx``, on the model's device. An LM's
        tokens may stay in a CPU memory map (uint16/uint32): the rows are gathered there and
        only the batch moves, as int64."""
        i = torch.tensor(np.asarray(idx), dtype=torch.long, device=self.x_train.device)
        x, y = self.x_train[i], self.y_train[i]
        if self.kind == "lm" and (x.device != self.device or x.dtype != torch.long):
            x = x.to(self.device, torch.long)
            y = x if self.y_train is self.x_train else y.to(self.device, torch.long)
        return x, y

    def logits(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return logits_of(functional_call(self.model, params, (x,)))

    def per_sample_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ(θ, z) for each sample: cross-entropy [B] (token-mean per sequence for LMs)."""
        return self.per_sample_loss_from_logits(self.logits(params, x), y)

    def per_sample_loss_from_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "classify":
            return F.cross_entropy(logits, y, reduction="none")
        return lm_loss_from_logits(logits, y)  # causal LM: y holds the tokens [B, S]

    @torch.no_grad()
    def evaluate(self, params: dict, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[float, float]:
        """(mean loss, accuracy) over a set; accuracy is NaN for LMs."""
        losses, correct = [], 0
        for s in range(0, x.shape[0], chunk):
            xb, yb = x[s : s + chunk], y[s : s + chunk]
            losses.append(self.per_sample_loss(params, xb, yb))
            if self.kind == "classify":
                correct += int((self.logits(params, xb).argmax(-1) == yb).sum())
        loss = float(torch.cat(losses).mean()) if losses else float("nan")
        acc = correct / x.shape[0] if self.kind == "classify" and x.shape[0] else float("nan")
        return loss, acc


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from dve_repro.errors import DveError

        raise DveError("runtime.device=cuda but no CUDA device is available; use runtime.device=cpu")
    return name


def build_task(cfg: Config, device: str = "cpu") -> Task:
    """Load the configured data and build the model (θ_0) on ``device``."""
    dtype = torch_dtype(cfg.train.dtype)
    if isinstance(cfg.data, ImageDataConfig):
        from dve_repro.data import load_image_data
        from dve_repro.models import build_model

        data = load_image_data(cfg.data).to(dtype, device)
        model = build_model(cfg.model, dtype).to(device)
        return Task(
            kind="classify",
            model=model,
            x_train=data.x_train,
            y_train=data.y_train,
            x_val=data.x_val,
            y_val=data.y_val,
            n_classes=data.n_classes,
            description=data.description,
            extra={
                "noisy_indices": data.noisy_indices,
                "true_labels": data.true_labels,
                "x_test": data.x_test,
                "y_test": data.y_test,
            },
        )
    return build_lm_task(cfg, device)


def build_lm_task(cfg: Config, device: str = "cpu") -> Task:
    """The language-model :class:`Task`: packed sequences (targets = inputs, shifted inside
    the loss), a GPT-NeoX at θ_0 (``lm.py`` builds it), and the linear layers DVEmb captures."""
    from dve_repro.text import load_text

    data = load_text(cfg.data, vocab_size=cfg.model.vocab_size, mapped=True)
    dtype = torch_dtype(cfg.train.dtype if cfg.train.dtype != "bfloat16" else "float32")
    model = build_gpt_neox(cfg.model, dtype).to(device)
    layers, left_out = linear_layers(model, cfg.model.capture_layers)
    # Training tokens stay in the cache's memory map (Task.batch moves each batch to the
    # device); the small validation set lives on the device.
    train, val = data.train, data.val.to(device)
    corrupted = np.zeros(0, dtype=np.int64)
    if cfg.data.corrupt_fraction > 0:
        train, corrupted = corrupt_sequences(train, cfg.data.corrupt_fraction, cfg.data.corrupt_seed,
                                             data.tokenizer_vocab_size)
    return Task(
        kind="lm",
        model=model,
        x_train=train,
        y_train=train,
        x_val=val,
        y_val=val,
        n_classes=cfg.model.vocab_size,
        description=f"{data.source_desc}; {len(train)} train / {len(val)} val sequences of {cfg.data.seq_len} tokens",
        extra={"capture_layers": [n for n, _ in layers], "left_out": left_out, "text_fingerprint": data.fingerprint,
               # the held-out documents' token stream (its first n_val rows are the validation
               # set); online selection draws its own split from the documents after them
               "heldout_stream": data.cache_path / "val.npy", "eot_id": data.eot_id,
               "noisy_indices": corrupted},
    )


def initial_params(task: Task) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.named_parameters()}
