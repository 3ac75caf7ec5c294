"""Per-sample gradients: two engines behind one layout, and a one-at-a-time reference.

Layout. A model's gradient is a list of *blocks*, one per module that owns parameters:
an ``nn.Linear`` block is the matrix ``[d_out, d_in + 1]`` (weight, with the bias as the
last column when there is one) flattened row-major; any other module's block is its
parameters flattened in ``named_parameters`` order. Projections (``projection.py``) and the
per-layer M of Algorithm 1 work block by block.

Engines
* ``hooks`` — forward/backward hooks on ``nn.Linear`` keep the layer input ``a`` [B, S, d_in]
  and the output gradient ``b`` [B, S, d_out]; the per-sample gradient is
  ``Σ_s b_s a_sᵀ`` (summed over tokens S for sequences; S = 1 for vectors). One batched
  backward gives every sample's factors, so capture during training costs no extra pass.
* ``func`` — ``torch.func.vmap(grad(loss of one sample))`` (:func:`per_sample_grads`): works
  for any model.

Loss scaling, stated once: a training step minimises ``Σ_i w_i ℓ_i`` with ``w_i = 1/|B|``
(mean loss), so the output gradient a hook sees is ``w_i ∂ℓ_i/∂out``; :class:`LinearFactorHooks`
divides it back out and every function here returns gradients of the *unweighted*
per-sample loss ``g_i = ∇ℓ_i``. The per-sample step weight ``η_t/|B_t|`` is applied only in
the embedding recursion.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LossFn = Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]  # (params, x, y) -> [B]


@dataclass(frozen=True)
class Block:
    """One gradient block. ``shape`` is (d_out, d_in + has_bias) for linear blocks and
    (embedding_dim, num_embeddings) for an ``nn.Embedding``: a lookup is a linear map of
    the one-hot token, so its [V, d] weight gradient is laid out transposed, [d, V], and
    projects like any linear layer's (``Σ_s g_s onehot(tok_s)ᵀ``)."""

    name: str  # module name
    kind: str  # "linear" | "embedding" | "other"
    params: tuple[str, ...]  # parameter names, in layout order
    shape: tuple[int, ...]
    has_bias: bool = False

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def gradient_layout(model: nn.Module, modules: list[str] | None = None) -> list[Block]:
    """Blocks of the model's parameters (or of the named modules only), in forward order."""
    blocks: list[Block] = []
    for name, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False))
        if not own or (modules is not None and name not in modules):
            continue
        full = [f"{name}.{p}" if name else p for p, _ in own]
        if isinstance(mod, nn.Linear):
            has_bias = mod.bias is not None
            names = (f"{name}.weight", f"{name}.bias") if has_bias else (f"{name}.weight",)
            blocks.append(Block(name, "linear", names, (mod.out_features, mod.in_features + has_bias), has_bias))
        elif isinstance(mod, nn.Embedding):
            blocks.append(Block(name, "embedding", (f"{name}.weight",), (mod.embedding_dim, mod.num_embeddings)))
        else:
            blocks.append(Block(name, "other", tuple(full), (sum(p.numel() for _, p in own),)))
    return blocks


def layout_dim(blocks: list[Block]) -> int:
    return sum(b.size for b in blocks)


def to_blocks(grads: dict[str, torch.Tensor], blocks: list[Block]) -> dict[str, torch.Tensor]:
    """Per-parameter per-sample grads {param: [B, *shape]} → {block: [B, block.size]}."""
    out = {}
    for blk in blocks:
        if blk.kind == "linear":
            w = grads[blk.params[0]]  # [B, d_out, d_in]
            parts = [w, grads[blk.params[1]].unsqueeze(-1)] if blk.has_bias else [w]
            out[blk.name] = torch.cat(parts, dim=-1).flatten(1)
        elif blk.kind == "embedding":
            out[blk.name] = grads[blk.params[0]].transpose(1, 2).flatten(1)  # [B, V, d] → [B, d·V]
        else:
            out[blk.name] = torch.cat([grads[p].flatten(1) for p in blk.params], dim=1)
    return out


def flatten_blocks(block_grads: dict[str, torch.Tensor], blocks: list[Block]) -> torch.Tensor:
    """{block: [B, size]} → [B, p] in layout order."""
    return torch.cat([block_grads[b.name] for b in blocks], dim=1)


FACTOR_KINDS = ("linear", "embedding")


class LinearFactorHooks:
    """Record the two factors of every hooked ``nn.Linear``'s (or ``nn.Embedding``'s)
    per-sample gradient.

    Use around one forward + backward of ``Σ_i w_i ℓ_i``; then :meth:`factors` returns
    ``{block: (a [B, S, d_in(+1)], b [B, S, d_out])}`` with ``b`` divided by ``w_i`` so that
    ``Σ_s b_s a_sᵀ = ∇_W ℓ_i`` (and the appended column of ones in ``a`` gives the bias).
    For an embedding ``a`` is the token ids [B, S] (integer: the one-hot rows, never
    materialised unless asked, see :func:`one_hot_factor`).
    """

    def __init__(self, model: nn.Module, blocks: list[Block]):
        self.blocks = [b for b in blocks if b.kind in FACTOR_KINDS]
        mods = dict(model.named_modules())
        self.modules = {b.name: mods[b.name] for b in self.blocks}
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LinearFactorHooks:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name: str):
        def hook(mod, inputs, output):
            self._inputs[name] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self._grads.__setitem__(name, g.detach()))

        return hook

    def captured(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """What the hooks saw, as it is: ``{block: (input, output gradient of Σ_i w_i ℓ_i)}``
        — no column of ones, no division by w (the input of
        :meth:`dve_repro.projection.Projector.project_captured`, which does both more cheaply)."""
        out = {b.name: (self._inputs[b.name], self._grads[b.name]) for b in self.blocks}
        self._inputs.clear()
        self._grads.clear()
        return out

    def factors(self, weights: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        scale = 1.0 / weights
        for blk in self.blocks:
            a = self._inputs[blk.name]
            b = self._grads[blk.name]
            if a.dim() == 2 and blk.kind == "linear":
                a, b = a.unsqueeze(1), b.unsqueeze(1)
            if blk.has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            b = b * scale.view(-1, *([1] * (b.dim() - 1))).to(b.dtype)
            out[blk.name] = (a, b)
        self._inputs.clear()
        self._grads.clear()
        return out


def one_hot_factor(a: torch.Tensor, b: torch.Tensor, d_in: int) -> torch.Tensor:
    """An embedding's input factor as rows: token ids [B, S] → one-hot [B, S, V] (dtype of b);
    a linear layer's factor is returned as it is."""
    if a.is_floating_point():
        return a
    return torch.nn.functional.one_hot(a, d_in).to(b.dtype)


def factors_to_grads(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     blocks: list[Block]) -> dict[str, torch.Tensor]:
    """Materialise ``Σ_s b_s a_sᵀ`` per sample: {block: [B, d_out * (d_in + 1)]}."""
    d_in = {blk.name: blk.shape[1] for blk in blocks}
    return {k: torch.einsum("bso,bsi->boi", b, one_hot_factor(a, b, d_in[k])).flatten(1)
            for k, (a, b) in factors.items()}


def per_sample_grads_hooks(
    model: nn.Module, loss_fn: LossFn, params: dict, x: torch.Tensor, y: torch.Tensor, blocks: list[Block]
) -> dict[str, torch.Tensor]:
    """Hook engine, materialised: {block: [B, size]} (linear blocks only)."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    w = torch.ones(x.shape[0], dtype=next(iter(p.values())).dtype, device=x.device)
    with LinearFactorHooks(model, blocks) as hooks:
        (loss_fn(p, x, y) * w).sum().backward()
    return factors_to_grads(hooks.factors(w), blocks)


def per_sample_grads(
    loss_fn: LossFn, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each sample's own gradient ``∇_θ ℓ(θ, z_i)`` by ``vmap(grad(·))``, for any model.

    ``loss_fn(params, x, y)`` returns the per-sample losses [B] of a batch; ``params`` is
    {name: tensor of shape s}; ``x`` [B, ...] and ``y`` [B, ...] are the batch (sample i is
    ``x[i]``, ``y[i]``, seen by ``loss_fn`` as a batch of one). Returns {name: [B, *s]}: row i
    is the gradient of sample i's (unweighted) loss. Gradients flow only through ``params``."""
    from torch.func import grad, vmap

    def one(p, xi, yi):
        return loss_fn(p, xi.unsqueeze(0), yi.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def per_sample_grads_func(
    loss_fn: LossFn, params: dict, x: torch.Tensor, y: torch.Tensor, blocks: list[Block]
) -> dict[str, torch.Tensor]:
    """``torch.func`` engine: {block: [B, size]} for any model."""
    names = {n for b in blocks for n in b.params}
    detached = {k: v.detach() for k, v in params.items()}
    # Parameters outside the requested blocks are held fixed (closed over, not differentiated).
    fixed = {k: v for k, v in detached.items() if k not in names}
    free = {k: v for k, v in detached.items() if k in names}
    grads = per_sample_grads(lambda f, xb, yb: loss_fn({**fixed, **f}, xb, yb), free, x, y)
    return to_blocks(grads, blocks)


def per_sample_grads_naive(
    loss_fn: LossFn, params: dict, x: torch.Tensor, y: torch.Tensor, blocks: list[Block]
) -> dict[str, torch.Tensor]:
    """Reference: one autograd call per sample. {block: [B, size]}."""
    names = [n for b in blocks for n in b.params]
    rows = []
    for i in range(x.shape[0]):
        p = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
        loss = loss_fn(p, x[i : i + 1], y[i : i + 1]).sum()
        g = torch.autograd.grad(loss, [p[n] for n in names])
        rows.append({n: gi.unsqueeze(0) for n, gi in zip(names, g, strict=True)})
    grads = {n: torch.cat([r[n] for r in rows]) for n in names}
    return to_blocks(grads, blocks)


def quiet_forward_ad(fn):
    """``fn`` with torch's "`torch.jit.script` is deprecated" warning silenced while it runs:
    forward-mode AD (``torch.func.jvp``) scripts its decompositions on first use, torch's
    internals that no user can act on. Scoped to the call, not installed at import."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            return fn(*args, **kwargs)

    return wrapper
