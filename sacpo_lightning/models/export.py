"""Exporting a trained policy as a self-contained Hugging Face folder, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sacpo_lightning.io import atomic_directory, atomic_write_json
from sacpo_lightning.models.policy import DTYPES, DtypeName, PolicySettings, load_causal_lm

STEP_METADATA = "sacpo_step.json"
ADAPTER_DIR = "adapter"


def export_policy(
    policy: PreTrainedModel,
    settings: PolicySettings,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    *,
    metadata: dict[str, Any],
    dtype: DtypeName | None = None,
) -> Path:
    """Writes merged weights (safetensors), tokenizer with chat template, step metadata and, for LoRA, the adapter.

    For LoRA and QLoRA runs the adapter is saved first, then merged into a freshly loaded, unquantized copy of the base
    model: the exported weights are exactly base + adapter, whatever quantization was used during training, and the
    training model is left untouched. The folder appears only when complete (see :func:`atomic_directory`).

    Args:
        policy: The trained model (a peft model for LoRA/QLoRA).
        settings: The settings the policy was built with (its base is reloaded from them).
        tokenizer: Saved beside the weights.
        output_dir: Target folder; replaced atomically if it exists.
        metadata: JSON-serialisable description of the step, written to ``sacpo_step.json``.
        dtype: Dtype of the exported weights; defaults to the dtype the base was loaded in.
    """
    dtype = dtype or settings.dtype
    with atomic_directory(output_dir) as tmp:
        if settings.uses_adapter:
            adapter_dir = tmp / ADAPTER_DIR
            policy.save_pretrained(adapter_dir, safe_serialization=True)
            from peft import PeftModel

            base = load_causal_lm(
                settings.name_or_path,
                dtype=dtype,
                gguf_file=settings.gguf_file,
                trust_remote_code=settings.trust_remote_code,
                revision=settings.revision,
                device_map="cpu",
            )
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            merged = policy
        merged.config.use_cache = True
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        state = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in merged.state_dict().items()}
        merged.config.dtype = dtype
        if merged.generation_config is not None and tokenizer.pad_token_id is not None:
            merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / STEP_METADATA, metadata)
    return Path(output_dir)


def read_step_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sacpo_step.json`` of an exported folder, or ``None`` for other folders."""
    import json

    meta = Path(path) / STEP_METADATA
    return json.loads(meta.read_text()) if meta.is_file() else None


@torch.no_grad()
def max_weight_difference(a: PreTrainedModel, b: PreTrainedModel) -> float:
    """Largest absolute difference between two models' matching parameters (for tests and sanity checks)."""
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max()) for k, v in a.state_dict().items())
