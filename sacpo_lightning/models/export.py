"""Exporting a trained policy as a self-contained Hugging Face folder, atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sacpo_lightning.errors import MissingFileError, UserError
from sacpo_lightning.io import atomic_directory, atomic_write_json
from sacpo_lightning.models.card import STEP_FILE, write_model_card
from sacpo_lightning.models.chain import (
    CHAIN_FILE,
    OWN_ADAPTER,
    TRAINABLE_ADAPTER,
    copy_links,
    read_chain,
    write_chain_file,
)
from sacpo_lightning.models.policy import PolicySettings, load_causal_lm, load_model_folder
from sacpo_lightning.models.registry import resolve_model_path
from sacpo_lightning.models.tokenizer import load_raw_tokenizer
from sacpo_lightning.precision import DTYPES, DtypeName

STEP_METADATA = STEP_FILE
ADAPTER_DIR = OWN_ADAPTER


def export_policy(
    policy: PreTrainedModel,
    settings: PolicySettings,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    *,
    metadata: dict[str, Any],
    dtype: DtypeName | None = None,
    merged: bool | None = None,
) -> Path:
    """Writes the trained policy with its tokenizer (and chat template) and ``sacpo_step.json``, atomically.

    Full fine-tuning writes the weights (safetensors). LoRA and QLoRA runs write the trained adapter to ``adapter/``,
    the upstream adapters the run started from to ``chain/<i>/``, the base model's config, and ``sacpo_chain.json``
    (see :mod:`sacpo_lightning.models.chain`); with ``merged`` they also write the merged weights, computed in a
    freshly loaded, unquantized copy of the base, so the folder then loads with ``AutoModelForCausalLM`` too. The
    folder appears only when complete (see :func:`atomic_directory`).

    Args:
        policy: The trained model (a peft model for LoRA/QLoRA).
        settings: The settings the policy was built with (its base is reloaded from them).
        tokenizer: Saved beside the weights.
        output_dir: Target folder; replaced atomically if it exists.
        metadata: JSON-serialisable description of the step, written to ``sacpo_step.json``.
        dtype: Dtype of the exported weights; defaults to the dtype the base was loaded in.
        merged: Also write merged full weights for an adapter run (default: only for full fine-tuning, where they are
            the only form).
    """
    dtype = dtype or settings.dtype
    with atomic_directory(output_dir) as tmp:
        if settings.uses_adapter:
            _write_adapter_chain(policy, settings, tmp, dtype)
            if merged:
                _write_merged(load_causal_lm(str(tmp), dtype=dtype, device_map="cpu"), tokenizer, tmp, dtype)
            else:
                from transformers import AutoConfig

                base = read_chain(tmp).base
                local = os.path.isdir(base)
                config = AutoConfig.from_pretrained(resolve_model_path(base) if not local else base,
                                                    trust_remote_code=settings.trust_remote_code)
                if hasattr(config, "quantization_config"):
                    del config.quantization_config
                config.dtype = dtype
                config.use_cache = True
                config.save_pretrained(tmp)
        else:
            _write_merged(policy, tokenizer, tmp, dtype)
        tokenizer.save_pretrained(tmp)
        has_weights = bool(merged or not settings.uses_adapter)
        atomic_write_json(tmp / STEP_METADATA, {**metadata, "merged_weights": has_weights})
        write_model_card(tmp)
    return Path(output_dir)


def export_plain_folder(
    src: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: DtypeName | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Writes any export or merge of this library as a plain Hugging Face folder, atomically.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files, the
    source's ``sacpo_*.json`` records (not the chain file: the adapters are merged into the weights) and a model card,
    so ``AutoModelForCausalLM.from_pretrained`` loads it without this library.

    Args:
        src: A full-weight folder, or an adapter export or adapter merge (its chain is merged into the base).
        output_dir: Target folder; replaced atomically if it exists.
        dtype: Dtype of the written weights (default: the source's).
        card: Extra fields for the model card (``budget``, ``evaluation``; see
            :func:`sacpo_lightning.models.card.build_model_card`).

    Raises:
        FileNotFoundError: ``src`` is not a model folder this library wrote or can load.
    """
    src_path = Path(os.path.expanduser(os.path.expandvars(str(src))))
    if not (src_path / "config.json").is_file() and not (src_path / CHAIN_FILE).is_file():
        raise MissingFileError(f"{src_path} is not a model folder (no config.json or {CHAIN_FILE}); "
                               "pass an export or merge folder.")
    if Path(output_dir).resolve() == src_path.resolve():
        raise UserError(f"OUT {output_dir} is the source folder; pick another folder.")
    model = load_model_folder(str(src_path), dtype)
    written_dtype = dtype or str(model.dtype).removeprefix("torch.")
    tokenizer = load_raw_tokenizer(src_path)
    with atomic_directory(output_dir) as tmp:
        _write_merged(model, tokenizer, tmp, written_dtype)
        tokenizer.save_pretrained(tmp)
        for record in sorted(src_path.glob("sacpo_*.json")):
            if record.name != CHAIN_FILE:
                shutil.copy2(record, tmp / record.name)
        write_model_card(tmp, source=str(src_path), **(card or {}))
    return Path(output_dir)


def _write_adapter_chain(policy, settings: PolicySettings, folder: Path, dtype: str) -> None:
    """The trained adapter, the upstream chain's adapters and ``sacpo_chain.json``."""
    policy.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True, selected_adapters=[TRAINABLE_ADAPTER])
    local = os.path.expanduser(os.path.expandvars(settings.name_or_path))
    upstream = read_chain(local) if os.path.isdir(local) else None
    links = copy_links(upstream.links, folder) if upstream is not None else []
    links.append({"path": ADAPTER_DIR, "scale": 1.0})
    write_chain_file(
        folder,
        upstream.base if upstream else settings.name_or_path,
        links,
        gguf_file=upstream.base_gguf_file if upstream else settings.gguf_file,
        revision=upstream.base_revision if upstream else settings.revision,
        dtype=dtype,
    )


def _write_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, dtype: str) -> None:
    model.config.use_cache = True
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    state = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in model.state_dict().items()}
    model.config.dtype = dtype
    if model.generation_config is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)


def read_step_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``sacpo_step.json`` of an exported folder, or ``None`` for other folders."""
    import json

    meta = Path(path) / STEP_METADATA
    return json.loads(meta.read_text()) if meta.is_file() else None
