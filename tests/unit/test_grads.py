"""Per-sample gradient engines against one-at-a-time autograd (SPEC §5), float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dve_repro.grads import (
    LinearFactorHooks,
    factors_to_grads,
    flatten_blocks,
    gradient_layout,
    layout_dim,
    per_sample_grads_func,
    per_sample_grads_hooks,
    per_sample_grads_naive,
)

ATOL = 1e-12


class TokenMLP(nn.Module):
    """nn.Linear applied per token to [B, S, d] inputs → logits [B, S, C]."""

    def __init__(self, d: int = 5, h: int = 7, c: int = 4, bias_out: bool = False):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.out = nn.Linear(h, c, bias=bias_out)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def mlp(bias_last: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                         nn.Linear(4, 3, bias=bias_last)).double()


def classify_loss(model):
    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")

    return loss


def token_loss(model):
    def loss(params, x, y):  # per-sample loss summed over tokens
        logits = functional_call(model, params, (x,))
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        return tok.view(y.shape).sum(dim=1)

    return loss


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_blocks_close(got: dict, want: dict, atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("bias_last", [True, False])
def test_engines_equal_naive_mlp(bias_last):
    model = mlp(bias_last)
    blocks = gradient_layout(model)
    assert [b.has_bias for b in blocks] == [True, True, bias_last]
    assert layout_dim(blocks) == sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    params, loss = params_of(model), classify_loss(model)
    ref = per_sample_grads_naive(loss, params, x, y, blocks)
    # the reference itself is the gradient of each single loss, in the documented layout
    p0 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss(p0, x[4:5], y[4:5]).sum().backward()
    last = blocks[-1]
    manual = p0[f"{last.name}.weight"].grad
    if bias_last:
        manual = torch.cat([manual, p0[f"{last.name}.bias"].grad[:, None]], dim=1)
    torch.testing.assert_close(ref[last.name][4], manual.flatten(), rtol=0, atol=0)
    assert_blocks_close(per_sample_grads_hooks(model, loss, params, x, y, blocks), ref)
    assert_blocks_close(per_sample_grads_func(loss, params, x, y, blocks), ref)
    # samples differ from each other (a batch-summed gradient would not pass the above)
    assert not torch.allclose(ref[blocks[0].name][0], ref[blocks[0].name][1])


def test_engines_equal_naive_sequences():
    torch.manual_seed(2)
    model = TokenMLP().double()
    blocks = gradient_layout(model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)  # [B, S, d]
    y = torch.randint(0, 4, (4, 6), generator=gen)
    params, loss = params_of(model), token_loss(model)
    ref = per_sample_grads_naive(loss, params, x, y, blocks)
    assert_blocks_close(per_sample_grads_hooks(model, loss, params, x, y, blocks), ref)
    assert_blocks_close(per_sample_grads_func(loss, params, x, y, blocks), ref)
    # the per-sample gradient is the sum over tokens: one token alone is not it
    one_tok = per_sample_grads_naive(loss, params, x[:, :1], y[:, :1], blocks)
    assert not torch.allclose(one_tok["inp"], ref["inp"])


class TokenEmbedMLP(nn.Module):
    """Token ids [B, S] → embedding → per-token linear → logits [B, S, C] (an LM in miniature)."""

    def __init__(self, vocab: int = 11, d: int = 5, c: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, c)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def test_engines_equal_naive_embedding_blocks():
    """An embedding's per-sample gradient Σ_s onehot(tok_s) g_sᵀ, laid out [d, V], from hook
    factors (token ids, output gradient) as from torch.func and one-at-a-time autograd."""
    torch.manual_seed(6)
    model = TokenEmbedMLP().double()
    blocks = gradient_layout(model)
    assert [(b.kind, b.shape) for b in blocks] == [("embedding", (5, 11)), ("linear", (4, 6))]
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 11, (4, 6), generator=gen)
    x[0, :3] = 2  # a repeated token: its gradient rows add up
    y = torch.randint(0, 4, (4, 6), generator=gen)
    params, loss = params_of(model), token_loss(model)
    ref = per_sample_grads_naive(loss, params, x, y, blocks)
    assert_blocks_close(per_sample_grads_hooks(model, loss, params, x, y, blocks), ref)
    assert_blocks_close(per_sample_grads_func(loss, params, x, y, blocks), ref)
    # layout: column v of the [d, V] block is the gradient of token v's embedding row
    g = ref["emb"].view(4, 5, 11)
    unused = sorted(set(range(11)) - set(x[1].tolist()))
    assert torch.all(g[1][:, unused] == 0) and g[0][:, 2].abs().sum() > 0


def test_hook_factors_undo_loss_weights():
    """Training minimises Σ w_i ℓ_i; factors(w) must return the unweighted ∇ℓ_i."""
    model = mlp()
    blocks = gradient_layout(model)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    params, loss = params_of(model), classify_loss(model)
    w = torch.tensor([0.5, 0.25, 1 / 3, 1 / 6, 2.0, 0.1], dtype=torch.float64)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    with LinearFactorHooks(model, blocks) as hooks:
        torch.autograd.grad((loss(p, x, y) * w).sum(), list(p.values()))
    got = factors_to_grads(hooks.factors(w), blocks)
    ref = per_sample_grads_naive(loss, params, x, y, blocks)
    assert_blocks_close(got, ref)
    # hooks are removed on exit: a later forward records nothing
    functional_call(model, params, (x,))
    assert hooks._inputs == {}


def test_func_engine_non_linear_blocks_and_subsets():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    blocks = gradient_layout(model)
    assert [b.kind for b in blocks] == ["other", "linear"]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    params, loss = params_of(model), classify_loss(model)
    ref = per_sample_grads_naive(loss, params, x, y, blocks)
    assert_blocks_close(per_sample_grads_func(loss, params, x, y, blocks), ref)
    sub = gradient_layout(model, ["3"])
    assert [b.name for b in sub] == ["3"]
    got = per_sample_grads_func(loss, params, x, y, sub)
    assert_blocks_close(got, {"3": ref["3"]})
    flat = flatten_blocks(ref, blocks)
    assert flat.shape == (5, layout_dim(blocks))
    torch.testing.assert_close(flat[:, -ref["3"].shape[1]:], ref["3"], rtol=0, atol=0)
