"""Model stage for the language-model experiments (E2–E5): a Pythia-style GPT-NeoX from config.

Reads a :class:`~dve_repro.config.GPTNeoXModelConfig` (``configs/model/pythia_*.yaml``) and
builds ``transformers.GPTNeoXForCausalLM`` with a random, seeded initialisation (the paper
trains from scratch); it downloads nothing and writes no artifact — the training stage saves
the weights. Every architecture value that the config does not carry is written down in
:func:`gpt_neox_config` rather than left to a transformers default (STYLE habit 2).

Initialisation is transformers' ``_init_weights``: every Linear and Embedding weight
~ N(0, initializer_range²), biases 0, LayerNorms (1, 0). That is not Pythia's GPT-NeoX
``small_init`` / ``wang_init`` scheme; architecture and parameter count are Pythia's.

Attention is the eager implementation: deterministic, and every linear layer is an
``nn.Linear`` that forward/backward hooks see (the per-sample gradient capture relies on it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dve_repro.config import GPTNeoXModelConfig
from dve_repro.errors import DveError

_BLOCK = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # forward order
#: ``model.capture_layers`` → (linears of each block, output head?, token embedding?).
CAPTURE_LAYERS = {
    "all": (_BLOCK, False, False),
    "mlp": (_BLOCK[2:], False, False),
    "all+head": (_BLOCK, True, False),
    "all+head+embed": (_BLOCK, True, True),
}
# The output head: ``lm_head`` in current transformers, ``embed_out`` in older releases.
HEAD_NAMES = ("lm_head", "embed_out")


def gpt_neox_config(cfg: GPTNeoXModelConfig):
    """The ``transformers.GPTNeoXConfig`` of ``cfg``, with every result-changing value explicit."""
    from transformers import GPTNeoXConfig

    if cfg.hidden_size % cfg.num_attention_heads:
        raise DveError(
            f"model.hidden_size={cfg.hidden_size} is not a multiple of "
            f"model.num_attention_heads={cfg.num_attention_heads}"
        )
    return GPTNeoXConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        # transformers 5 keeps GPT-NeoX's rotary_pct / rotary_emb_base in rope_parameters.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(cfg.rotary_emb_base),
            "partial_rotary_factor": float(cfg.rotary_pct),
        },
        use_parallel_residual=cfg.use_parallel_residual,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        layer_norm_eps=cfg.layer_norm_eps,
        # Pythia's values, written down so that a transformers default can never change a run.
        hidden_act="gelu",  # exact (erf) GELU
        attention_bias=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,  # <|endoftext|> of the GPT-NeoX-20B tokenizer (used by generate only)
        eos_token_id=0,
        use_cache=False,
        attn_implementation="eager",
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_gpt_neox(cfg: GPTNeoXModelConfig, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``GPTNeoXForCausalLM`` (seeded by ``cfg.init_seed``), in ``dtype``.

    The global torch RNG is restored afterwards, so building a model does not shift any
    other random stream. Raises :class:`DveError` when ``cfg.expected_parameters`` > 0 and the
    built model has another parameter count.
    """
    from transformers import GPTNeoXForCausalLM

    hf_cfg = gpt_neox_config(cfg)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.init_seed)
    try:
        model = GPTNeoXForCausalLM(hf_cfg)
    finally:
        torch.random.set_rng_state(state)
    n = count_parameters(model)
    if cfg.expected_parameters > 0 and n != cfg.expected_parameters:
        raise DveError(
            f"model {cfg.preset} has {n:,} parameters but model.expected_parameters="
            f"{cfg.expected_parameters:,}; check the architecture fields"
        )
    return model.to(dtype)


def lm_loss_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence: logits [B, L, V], tokens y [B, L] → [B].

    The causal-LM loss of every stage (``Task.per_sample_loss`` of an LM task). Position t
    predicts token t+1 (the shift HF applies with ``labels=input_ids``), so each sequence
    averages L−1 token losses; the mean over B equals HF's batch loss. Logits in half
    precision are upcast to float32 first.
    """
    # The last position has no target: it is masked (ignore_index) instead of slicing the
    # logits, because a slice of the [B, L, V] logits costs a full-size copy forward and a
    # zero-fill + copy backward (~25% of a tiny-LM step, V = 50,304).
    lg = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    tgt = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], dim=1)
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none", ignore_index=-100)
    return tok.view(y.shape[0], -1).sum(dim=1) / (y.shape[1] - 1)


def linear_layers(model: nn.Module, which: str = "all") -> tuple[list[tuple[str, nn.Linear]], str]:
    """The block linears whose per-sample gradients are captured, and what is left out.

    ``which="all"``: per block ``attention.query_key_value``, ``attention.dense``,
    ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``; ``"mlp"``: the last two; ``"all+head"``:
    the block linears and the output head (``lm_head``; ``embed_out`` in older transformers),
    whose [V, d] gradient is half of a small model's parameters; ``"all+head+embed"``: also
    the token embedding (``embed_in``, captured from the token ids and its output gradient).
    Returns ``([(qualified name, module), …] in forward order, description)``; the
    LayerNorms are never included, and the description names what is left out with its
    parameter count.
    """
    if which not in CAPTURE_LAYERS:
        raise DveError(f"model.capture_layers must be one of {sorted(CAPTURE_LAYERS)} (got {which!r})")
    wanted, head, embed = CAPTURE_LAYERS[which]

    def chosen(name: str, m: nn.Module) -> bool:
        if isinstance(m, nn.Linear):
            in_block = ".layers." in f".{name}" and name.rsplit(".", 1)[-1] in wanted
            return in_block or (head and name in HEAD_NAMES)
        return embed and isinstance(m, nn.Embedding) and name.endswith("embed_in")

    layers = [(name, m) for name, m in model.named_modules() if chosen(name, m)]
    covered = {id(p) for _, m in layers for p in m.parameters(recurse=False)}
    left: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) in covered:
            continue
        parts = name.split(".")
        if "layers" in parts:  # group per-block parameters by their module type, not by block
            i = parts.index("layers")
            group = ".".join(["layers.*", *parts[i + 2 : -1]])
        else:
            group = ".".join(parts[:-1])
        left[group] = left.get(group, 0) + p.numel()
    n_total = count_parameters(model)
    n_in = n_total - sum(left.values())
    blocks = len({name.split(".layers.")[1].split(".")[0] for name, _ in layers if ".layers." in name})
    extra = [name for name, m in layers if name in HEAD_NAMES or isinstance(m, nn.Embedding)]
    description = (
        f"{len(layers)} layers ({', '.join(wanted)} in each of {blocks} blocks"
        + "".join(f", {n}" for n in extra) + ") hold "
        f"{n_in:,} of {n_total:,} parameters ({100 * n_in / n_total:.1f}%); left out: "
        + ", ".join(f"{g} ({n:,})" for g, n in left.items())
    )
    return layers, description


def corrupt_sequences(train: torch.Tensor, fraction: float, seed: int, vocab: int) -> tuple[torch.Tensor, np.ndarray]:
    """A copy of the training tokens [N, S] (int64, in memory) with ``round(fraction·N)``
    sequences, chosen by ``default_rng([seed, 2])``, replaced by uniformly random ids below
    the tokenizer's vocabulary; returns it and the replaced indices (sorted)."""
    n, seq = train.shape
    rng = np.random.default_rng([seed, 2])
    idx = np.sort(rng.choice(n, size=round(fraction * n), replace=False))
    out = train.to(torch.int64).numpy().copy()  # a writable copy (train may be a read-only memory map)
    out[idx] = rng.integers(0, vocab, size=(len(idx), seq))
    return torch.from_numpy(out), idx
