"""The losses training actually uses (``Task.per_sample_loss_from_logits``) against
independent definitions: Hugging Face's ``GPTNeoXForCausalLM(labels=…)`` loss for the
language model, −log softmax at the label for classifiers (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from oracle_runs import classifier_task, lm_task

# Same float64 log-softmax, different reduction order: ~1e-16 measured.
LOSS_RTOL = 1e-12
# Hugging Face's causal-LM loss casts the logits to float32 first (transformers'
# ForCausalLMLoss: ``logits.float()``), so it matches to float32 precision only.
HF_RTOL = 1e-6


def sliced_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Independent float64 definition: the logits of positions 0…L−2 against tokens 1…L−1,
    averaged per sequence (a slice, where the package masks the last position)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def test_lm_task_loss_equals_hugging_face_labels_loss():
    task = lm_task(n_train=5, seq_len=7)
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    x = task.x_train
    ours = task.per_sample_loss(params, x, x)  # [B]: the mean over the L − 1 predicted tokens
    assert ours.shape == (5,) and ours.dtype == torch.float64
    with torch.no_grad():
        hf_batch = task.model(input_ids=x, labels=x).loss
        hf_each = torch.stack(
            [task.model(input_ids=x[i : i + 1], labels=x[i : i + 1]).loss for i in range(5)]
        )
        lm_each = sliced_lm_loss(task.model(input_ids=x).logits, x)
    torch.testing.assert_close(ours.mean().float(), hf_batch, rtol=HF_RTOL, atol=0)
    torch.testing.assert_close(ours.float(), hf_each, rtol=HF_RTOL, atol=0)
    torch.testing.assert_close(ours, lm_each, rtol=LOSS_RTOL, atol=0)
    assert ours.std() > 1e-3, (
        "sequences must have different losses for the per-sequence check to bite"
    )


def test_lm_loss_gradient_equals_hugging_face():
    task = lm_task(n_train=3, seq_len=5)
    x = task.x_train
    params = {k: v.detach().requires_grad_(True) for k, v in task.model.named_parameters()}
    g_ours = torch.autograd.grad(task.per_sample_loss(params, x, x).mean(), list(params.values()))
    task.model.zero_grad()
    task.model(input_ids=x, labels=x).loss.backward()
    for (name, p), g in zip(task.model.named_parameters(), g_ours, strict=True):
        torch.testing.assert_close(
            g, p.grad, rtol=HF_RTOL, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )
    task.model.zero_grad()


def test_classifier_loss_is_negative_log_softmax_at_the_label():
    task = classifier_task()
    params = {k: v.detach() for k, v in task.model.named_parameters()}
    logits = task.logits(params, task.x_train)
    want = -(logits - torch.logsumexp(logits, dim=1, keepdim=True)).gather(
        1, task.y_train[:, None]
    )[:, 0]
    got = task.per_sample_loss(params, task.x_train, task.y_train)
    torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0)
