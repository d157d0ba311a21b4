"""Adapter chains: a base model plus LoRA adapters applied in order, each with a scale.

A LoRA or QLoRA step exports its adapter, not a merged copy of the model. The export folder then describes its policy
as ``base + sum_i scale_i * Delta_i`` in ``sacpo_chain.json``::

    {"base_model": "smollm2", "base_gguf_file": null, "base_revision": null, "dtype": "float32",
     "links": [{"path": "chain/0", "scale": 1.0}, {"path": "adapter", "scale": 1.0}]}

with every adapter folder inside the export (the upstream ones copied under ``chain/``), so a folder is
self-contained. SACPO's step 2 loads the SFT base (quantized for QLoRA) with the step-1 adapter attached and frozen,
and trains a second adapter: switching that second adapter off gives back exactly the trained step-1 policy, with the
same quantized base, rather than a re-quantized merged copy. A P-SACPO merge of two chains with one base is again a
chain (the weight-space merge ``(1 - q) theta_A + q theta_B`` is linear in each adapter's update), so a merge weight
costs a few adapter copies instead of a full model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sacpo_lightning.errors import MissingFileError, UserError
from sacpo_lightning.io import atomic_write_json

CHAIN_FILE = "sacpo_chain.json"
OWN_ADAPTER = "adapter"
CHAIN_DIR = "chain"
TRAINABLE_ADAPTER = "default"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class AdapterLink:
    """One adapter of a chain: its peft folder and the factor its update is multiplied by."""

    path: Path
    scale: float = 1.0

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the adapter's config and weights: equal adapters in different folders match."""
        h = hashlib.sha256()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            file = self.path / name
            if file.is_file():
                with open(file, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class AdapterChain:
    """A base model and the adapters applied to it, read from a folder's ``sacpo_chain.json``."""

    base: str
    links: tuple[AdapterLink, ...]
    base_gguf_file: str | None = None
    base_revision: str | None = None
    dtype: str | None = None


def has_full_weights(path: str | os.PathLike) -> bool:
    """Whether a folder holds the full model weights (a merged export or any Hugging Face model folder)."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def read_chain(name_or_path: str | os.PathLike) -> AdapterChain | None:
    """The adapter chain a folder describes, or ``None`` for anything else (Hub ids, named models, plain folders).

    Raises:
        FileNotFoundError: An adapter the chain lists is missing from the folder.
    """
    path = Path(os.path.expanduser(os.path.expandvars(str(name_or_path))))
    file = path / CHAIN_FILE
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    links = []
    for link in raw["links"]:
        folder = (path / link["path"]).resolve()
        if not (folder / "adapter_config.json").is_file():
            raise MissingFileError(f"{file}: adapter folder {folder} listed in 'links' has no adapter_config.json")
        links.append(AdapterLink(folder, float(link.get("scale", 1.0))))
    return AdapterChain(
        base=raw["base_model"],
        links=tuple(links),
        base_gguf_file=raw.get("base_gguf_file"),
        base_revision=raw.get("base_revision"),
        dtype=raw.get("dtype"),
    )


def normalize_base(name_or_path: str) -> str:
    """Local folders become absolute paths (a chain file must not depend on the working directory)."""
    expanded = os.path.expanduser(os.path.expandvars(name_or_path))
    return os.path.abspath(expanded) if os.path.isdir(expanded) else name_or_path


def chain_fingerprint(chain: AdapterChain) -> dict[str, Any]:
    """What identifies a chain's numbers: the base and each adapter's content and scale."""
    return {"base": chain.base, "gguf_file": chain.base_gguf_file, "revision": chain.base_revision,
            "links": [[link.fingerprint(), link.scale] for link in chain.links]}


def copy_links(links: Sequence[AdapterLink], folder: Path) -> list[dict[str, Any]]:
    """Copies adapters into ``folder/chain/<i>``; returns their ``links`` entries (paths relative to ``folder``).

    Adapters with the same content are copied once and their scales added (the updates are linear in the scale).
    """
    merged: dict[str, tuple[AdapterLink, float]] = {}
    for link in links:
        key = link.fingerprint()
        previous = merged.get(key)
        merged[key] = (link, link.scale + (previous[1] if previous else 0.0))
    entries = []
    for i, (link, scale) in enumerate(merged.values()):
        if scale == 0.0:
            continue
        target = folder / CHAIN_DIR / str(i)
        shutil.copytree(link.path, target)
        entries.append({"path": f"{CHAIN_DIR}/{i}", "scale": scale})
    return entries


def write_chain_file(folder: Path, base: str, links: list[dict[str, Any]], *, gguf_file: str | None,
                     revision: str | None, dtype: str | None) -> None:
    atomic_write_json(folder / CHAIN_FILE, {"base_model": normalize_base(base), "base_gguf_file": gguf_file,
                                            "base_revision": revision, "dtype": dtype, "links": links})


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_adapter_scale(model: torch.nn.Module, adapter: str, scale: float) -> None:
    """Multiplies ``adapter``'s update by ``scale`` in every LoRA layer (peft's ``set_scale``)."""
    for layer in _lora_layers(model):
        layer.set_scale(adapter, scale)


@torch.no_grad()
def merge_links(model: torch.nn.Module, links: Sequence[AdapterLink]) -> torch.nn.Module:
    """Merges each adapter, scaled, into an unquantized model's weights; returns the plain model."""
    from peft import PeftModel

    for link in links:
        peft_model = PeftModel.from_pretrained(model, str(link.path), adapter_name="link")
        if link.scale != 1.0:
            set_adapter_scale(peft_model, "link", link.scale)
        model = peft_model.merge_and_unload()
    return model


def attach_frozen_links(model: torch.nn.Module, links: Sequence[AdapterLink]):
    """Attaches the adapters, frozen and active, to a (possibly quantized) base: a peft model whose adapters are named
    ``link0``, ``link1``, ...

    A frozen link's LoRA dropout is replaced by the identity: it is part of the reference (the upstream policy), which
    must not change between forward passes, and ``model.train()`` would otherwise switch the saved ``lora_dropout``
    back on, so that at initialisation the trained policy would differ from its reference.
    """
    from peft import PeftModel

    peft_model = None
    for i, link in enumerate(links):
        name = f"link{i}"
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(link.path), adapter_name=name, is_trainable=False)
        else:
            peft_model.load_adapter(str(link.path), adapter_name=name, is_trainable=False)
        if link.scale != 1.0:
            set_adapter_scale(peft_model, name, link.scale)
        for layer in _lora_layers(peft_model):
            if name in layer.lora_dropout:
                layer.lora_dropout[name] = torch.nn.Identity()
    return peft_model


def activate(peft_model, frozen: Sequence[str], trainable: str | None = None) -> None:
    """Makes ``frozen`` (and ``trainable``) the active adapters; only ``trainable``'s weights require gradients."""
    names = list(frozen) + ([trainable] if trainable else [])
    peft_model.base_model.set_adapter(names)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(trainable is not None and f".{trainable}." in name)


@contextmanager
def reference_adapters(model: torch.nn.Module):
    """Inside, the model computes its reference: the frozen chain adapters stay on and the trained adapter is off.

    A model without a chain (``sacpo_frozen_adapters`` empty or absent) disables its adapter altogether. Only the active
    adapter list changes; no weight and no ``requires_grad`` flag is touched.
    """
    frozen = list(getattr(model, "sacpo_frozen_adapters", []) or [])
    if not frozen:
        with model.disable_adapter():
            yield
        return
    layers = _lora_layers(model)
    saved = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = list(frozen)
        yield
    finally:
        for layer, active in zip(layers, saved, strict=True):
            layer._active_adapter = active


def is_chain_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder described by an adapter chain."""
    return (Path(os.path.expanduser(str(path))) / CHAIN_FILE).is_file()


def merge_chains(dir_a: str | os.PathLike, dir_b: str | os.PathLike, q: float, folder: Path) -> dict[str, Any]:
    """Writes into ``folder`` the chain of ``(1 - q) * theta_A + q * theta_B`` for two chains on one base.

    With ``theta_A = base + sum_i s_i Delta_i`` and ``theta_B = base + sum_j t_j Delta'_j`` the weight-space merge is
    ``base + sum_i (1 - q) s_i Delta_i + sum_j q t_j Delta'_j``: the same chain with scaled adapters. Adapters the two
    share (SACPO's step-1 adapter is in both) are stored once with their scales added, so ``q = 0`` gives exactly A's
    chain and ``q = 1`` exactly B's. The config and tokenizer files are copied from A.

    Returns:
        The ``links`` entries written.

    Raises:
        ValueError: The two chains have different bases.
    """
    a, b = read_chain(dir_a), read_chain(dir_b)
    if a is None or b is None:
        raise ValueError(f"merge_chains needs two adapter-chain folders, got {dir_a} and {dir_b}")
    if (a.base, a.base_gguf_file, a.base_revision) != (b.base, b.base_gguf_file, b.base_revision):
        raise UserError(f"Cannot merge adapter chains with different bases: {a.base} ({dir_a}) and {b.base} "
                        f"({dir_b}).")
    links = [AdapterLink(link.path, (1.0 - q) * link.scale) for link in a.links]
    links += [AdapterLink(link.path, q * link.scale) for link in b.links]
    entries = copy_links(links, folder)
    write_chain_file(folder, a.base, entries, gguf_file=a.base_gguf_file, revision=a.base_revision, dtype=a.dtype)
    skip = {CHAIN_FILE, "sacpo_step.json", "sacpo_merge.json", *WEIGHT_FILES}
    for entry in Path(dir_a).iterdir():
        if entry.is_file() and entry.name not in skip:
            shutil.copy2(entry, folder / entry.name)
    return entries
