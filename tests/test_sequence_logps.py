"""AlignmentModule.sequence_logps projects only the scored positions onto the vocabulary, with unchanged log-probs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from sacpo_lightning.logprobs import sequence_logprobs
from sacpo_lightning.models.policy import LoraSettings, PolicySettings
from sacpo_lightning.modules import RewardDPO


def ragged_batch(prompt_lengths=(7, 3, 9, 5), response_lengths=(4, 6, 2, 5), seed=0) -> dict:
    """Right-padded rows whose prompts (label -100) have different lengths; the last row is the shortest."""
    g = torch.Generator().manual_seed(seed)
    width = max(p + r for p, r in zip(prompt_lengths, response_lengths, strict=True)) + 2
    n = len(prompt_lengths)
    ids = torch.randint(10, 500, (n, width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        mask[i, : p + r] = 1
        labels[i, p : p + r] = ids[i, p : p + r]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class IntKeepLlama(LlamaForCausalLM):
    """A model whose forward takes ``logits_to_keep`` as an int only (not built on ``slice_logits_to_keep``)."""

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, logits_to_keep=0, **kwargs):
        assert isinstance(logits_to_keep, int)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)


class AllLogitsLlama(LlamaForCausalLM):
    """A model whose forward has no ``logits_to_keep``."""

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def build(tiny_model_dir: str, finetune: str, average: bool = False) -> RewardDPO:
    policy = PolicySettings(name_or_path=tiny_model_dir, finetune=finetune, lora=LoraSettings(r=4, alpha=8))
    module = RewardDPO(policy=policy, average_log_prob=average)
    module.configure_model()
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return module


def full_logits_answer(module: RewardDPO, batch: dict, average: bool) -> torch.Tensor:
    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["labels"], average=average)


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("average", [False, True])
def test_only_scored_positions_reach_the_lm_head(tiny_model_dir, finetune, average):
    module = build(tiny_model_dir, finetune, average)
    batch = ragged_batch()
    shapes = []
    module.policy.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.logits.shape)))
    got = module.sequence_logps(module.policy, **batch)
    torch.testing.assert_close(got, full_logits_answer(module, batch, average), atol=1e-5, rtol=1e-6)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert shapes[0] == (scored + 1, 512)  # the scored positions and one unused last position, flattened
    got.sum().backward()  # gradients flow through the selected positions
    assert all(p.grad is not None for p in module.policy.parameters() if p.requires_grad)


@pytest.mark.parametrize("average", [False, True])
def test_models_without_mask_support_keep_the_last_positions_or_all(tiny_model_dir, average):
    module = build(tiny_model_dir, "full", average)
    batch = ragged_batch()
    expected = full_logits_answer(module, batch, average)
    shapes = []
    module.policy.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.logits.shape)))
    module.policy.__class__ = IntKeepLlama
    got = module.sequence_logps(module.policy, **batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    width = batch["input_ids"].shape[1]
    assert shapes[-1] == (4, width - 3 + 1, 512)  # from the position before the shortest prompt's first response token
    module.policy.__class__ = AllLogitsLlama
    torch.testing.assert_close(module.sequence_logps(module.policy, **batch), expected, atol=1e-5, rtol=1e-6)
    assert shapes[-1] == (4, width, 512)


def test_rows_without_labels_score_zero(tiny_model_dir):
    module = build(tiny_model_dir, "lora")
    batch = ragged_batch()
    batch["labels"][:] = -100
    assert module.sequence_logps(module.policy, **batch).tolist() == [0.0] * 4
