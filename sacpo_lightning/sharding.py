"""FSDP wrapping driven by the model's own declaration of its unsplittable blocks.

Hugging Face models list the module classes that must stay whole on one device in ``_no_split_modules`` (the decoder
layer: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``MistralDecoderLayer``, ...). Wrapping exactly those gives one
FSDP unit per decoder layer for any architecture, where a hard-coded class path fits one model family only.
"""

from __future__ import annotations

from torch import nn


def no_split_module_names(root: nn.Module) -> set[str]:
    """The class names every Hugging Face model under ``root`` declares in ``_no_split_modules``."""
    names: set[str] = set()
    for module in root.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


class NoSplitModulesPolicy:
    """An FSDP ``auto_wrap_policy`` and ``activation_checkpointing_policy`` that wraps the model's decoder layers.

    FSDP calls the policy top-down (``recurse=True`` on a parent before its children), so the names are read from the
    first Hugging Face model met, before any of its layers is decided on. Used from YAML as
    ``auto_wrap_policy: {class_path: sacpo_lightning.sharding.NoSplitModulesPolicy}``.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            self.names.update(declared)
        if recurse:
            return True  # always look inside; the decision is made per module below
        return type(module).__name__ in self.names

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
