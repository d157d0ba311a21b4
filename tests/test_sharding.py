"""FSDP wraps the decoder layers each model declares in ``_no_split_modules``, for any architecture.

Neither Lightning's ``FSDPStrategy`` nor torch's ``FullyShardedDataParallel`` runs without an accelerator (both
refuse a CPU-only machine), so the policy is checked here on the two paths of FSDP that do run on a CPU: the recursive
wrapping FSDP's constructor applies a callable policy through (with a marker class in place of the FSDP unit), and
activation checkpointing, which FSDP's ``activation_checkpointing_policy`` applies with the same policy. The shipped
``configs/strategies/fsdp.yaml`` is parsed into a strategy that carries the policy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _recursive_wrap
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from sacpo_lightning.sharding import NoSplitModulesPolicy, no_split_module_names

LAYERS = 3
ARCHS = [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer")]


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


class Unit(nn.Module):
    """Stands in for an FSDP unit: records which module FSDP would have wrapped."""

    def __init__(self, module: nn.Module, **_: object) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class Root(nn.Module):
    """A LightningModule-like root holding a policy and its frozen reference copy."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.policy = build(arch)
        self.ref_model = build(arch)


@pytest.mark.parametrize(("arch", "layer"), ARCHS)
def test_fsdp_auto_wrap_makes_one_unit_per_declared_decoder_layer(arch, layer):
    assert no_split_module_names(build(arch)) == {layer}
    root = Root(arch)
    _recursive_wrap(root, NoSplitModulesPolicy(), wrapper_cls=Unit, ignored_modules=set(), ignored_params=set(),
                    only_wrap_children=True)
    units = [type(m.module).__name__ for m in root.modules() if isinstance(m, Unit)]
    assert units == [layer] * (2 * LAYERS)  # every layer of the policy and of the reference, nothing else


def test_a_hard_coded_llama_class_would_not_wrap_qwen2():
    """The near miss: the old config named LlamaDecoderLayer, which leaves a Qwen2 model as one unsharded unit."""
    root = Root("qwen2")
    wrap = ModuleWrapPolicy({LlamaDecoderLayer})
    _recursive_wrap(root, wrap, wrapper_cls=Unit, ignored_modules=set(), ignored_params=set(), only_wrap_children=True)
    assert not any(isinstance(m, Unit) for m in root.modules())


@pytest.mark.parametrize(("arch", "layer"), ARCHS)
def test_activation_checkpointing_policy_wraps_decoder_layers_and_keeps_gradients(arch, layer):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = build(arch)
    plain(input_ids=ids, labels=ids).loss.backward()

    model = build(arch)
    apply_activation_checkpointing(model, auto_wrap_policy=NoSplitModulesPolicy())
    wrapped = [type(m._checkpoint_wrapped_module).__name__ for m in model.modules() if isinstance(m, CheckpointWrapper)]
    assert wrapped == [layer] * LAYERS
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
