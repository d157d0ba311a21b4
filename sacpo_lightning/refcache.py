"""Reference log-prob cache: the frozen reference's sequence log-probs of every example, computed once and stored.

The reference policy never changes during a step, so its log-prob of each training and validation row is a constant
of the data. Computing it once before training removes the reference forward pass from every step (and from every
later run on the same data and reference). A cache file is a safetensors file of (N,) float tensors per split,

- pairs: ``<split>.chosen`` and ``<split>.rejected`` (prompt + chosen / prompt + rejected of example ``i``);
- KTO: ``<split>.completion`` and ``<split>.kl`` (prompt + completion, and prompt + the example's fixed mismatched
  KL completion, see :func:`~sacpo_lightning.data.tokenization.batch_tokenize_kto`);

plus a JSON metadata entry recording what the values depend on: the reference weights, the data and its tokenization,
the token ids themselves, ``average_log_prob``, the precision and the device type. A file whose metadata, tensor names
or example counts do not match what a run expects is stale and is rebuilt.

Everything here is plain tensor and file code; :class:`sacpo_lightning.callbacks.ReferenceCache` wires it into a fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sacpo_lightning.io import atomic_write_file
from sacpo_lightning.models.chain import chain_fingerprint, read_chain
from sacpo_lightning.models.policy import PolicySettings
from sacpo_lightning.models.registry import resolve_model_path
from sacpo_lightning.progress import Progress

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "batch_reference_logps",
    "cache_key",
    "columns_for",
    "compute_reference_logps",
    "examples_fingerprint",
    "load_reference_cache",
    "model_fingerprint",
    "save_reference_cache",
]

FORMAT_VERSION = 1
METADATA_KEY = "sacpo_ref_cache"
_COLUMNS = {"pairs": ("chosen", "rejected"), "kto": ("completion", "kl")}
# Policy settings that change the reference's numbers; the adapter settings do not (the reference runs without it).
_REFERENCE_SETTINGS = ("dtype", "gguf_file", "revision", "attn_implementation", "trust_remote_code")

ReferenceFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def columns_for(kind: str) -> tuple[str, str]:
    """The two cached columns of a data kind: ``("chosen", "rejected")`` or ``("completion", "kl")``."""
    if kind not in _COLUMNS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(_COLUMNS)}")
    return _COLUMNS[kind]


# ------------------------------------------------------------------------------------------------ fingerprints
def model_fingerprint(settings: PolicySettings) -> dict[str, Any]:
    """What identifies the reference model's numbers.

    A local folder (the named models resolve to one, and SACPO's step 2 uses the step-1 export) is identified by the
    name, size and modification time of each of its top-level files; a Hub id by the id and revision. Quantization
    (QLoRA) changes the reference's numbers, so its settings are included when it is on.
    """
    path = resolve_model_path(settings.name_or_path)
    identity: dict[str, Any]
    if os.path.isdir(path):
        files = {}
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                stat = entry.stat()
                files[entry.name] = [stat.st_size, stat.st_mtime_ns]
        identity = {"path": os.path.abspath(path), "files": files}
        chain = read_chain(path)
        if chain is not None:
            # the adapters live in sub-folders: identify them by content
            identity["chain"] = chain_fingerprint(chain)
    else:
        identity = {"hub": settings.name_or_path}
    identity["settings"] = {k: getattr(settings, k) for k in _REFERENCE_SETTINGS}
    if settings.finetune == "qlora":
        identity["quantization"] = {"qlora_compute_dtype": settings.qlora_compute_dtype,
                                    "qlora_double_quant": settings.qlora_double_quant}
    return identity


def examples_fingerprint(examples: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 (16 hex digits) of the tokenized examples: every field, token ids included, in order."""
    h = hashlib.sha256()
    for example in examples:
        for key in sorted(example):
            value = example[key]
            h.update(key.encode())
            if isinstance(value, list):
                h.update(len(value).to_bytes(8, "little"))
                h.update(array("q", value).tobytes())
            else:
                h.update(repr(value).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def cache_key(components: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the JSON of ``components``; names the cache file."""
    blob = json.dumps({"version": FORMAT_VERSION, **components}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- computing
def _row_length(example: Mapping[str, Any]) -> int:
    if "completion_ids" in example:
        return len(example["prompt_ids"]) + max(len(example["completion_ids"]), len(example["kl_completion_ids"]))
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def compute_reference_logps(
    reference_logps: ReferenceFn,
    examples: Sequence[Mapping[str, Any]],
    collate: Callable[[list[Mapping[str, Any]]], dict[str, Tensor]],
    kind: str,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    indices: Sequence[int] | None = None,
    desc: str = "reference log-probs",
) -> tuple[dict[str, Tensor], Tensor]:
    """Reference log-probs of ``examples`` (all, or those at ``indices``), longest first to limit padding.

    Args:
        reference_logps: ``(input_ids, attention_mask, labels) -> (N,)`` log-probs, run without gradients.
        examples: Tokenized examples of one split, ``examples[i]["index"] == i``.
        collate: Turns a list of examples into a batch (``collate_pairs`` or ``collate_kto`` with the run's padding).
        kind: ``pairs`` or ``kto``.
        batch_size: Examples per forward pass.
        device: Where the batches go.
        indices: Only these examples (one process's shard); default all.
        desc: Start of the progress lines (:class:`~sacpo_lightning.progress.Progress`).

    Returns:
        ``(columns, computed)``: ``{column: (N,) float32}`` with zeros where not computed, and the (N,) float32
        indicator of the computed examples (for summing shards across processes).
    """
    first, second = columns_for(kind)
    n = len(examples)
    todo = list(range(n)) if indices is None else list(indices)
    todo.sort(key=lambda i: (-_row_length(examples[i]), i))
    values = {first: torch.zeros(n, dtype=torch.float32), second: torch.zeros(n, dtype=torch.float32)}
    computed = torch.zeros(n, dtype=torch.float32)
    with Progress(len(todo), desc, unit="examples") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch = collate([examples[i] for i in chunk])
            at = torch.tensor(chunk, dtype=torch.long)
            if not torch.equal(batch["index"], at):
                raise ValueError("examples[i]['index'] must equal i for the reference cache; got a reordered split.")
            with torch.no_grad():
                if kind == "pairs":
                    out = reference_logps(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
                    out = out.float().cpu()
                    values[first][at], values[second][at] = out[: len(chunk)], out[len(chunk) :]
                else:
                    out = reference_logps(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
                    kl_keys = ("kl_input_ids", "kl_attention_mask", "kl_labels")
                    kl = reference_logps(*(batch[k].to(device) for k in kl_keys))
                    values[first][at], values[second][at] = out.float().cpu(), kl.float().cpu()
            computed[at] = 1.0
            bar.update(len(chunk))
    return values, computed


def batch_reference_logps(batch: Mapping[str, Tensor], columns: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The cached values for one batch, laid out as the step modules read them.

    Args:
        batch: A collated batch with ``index`` (B,).
        columns: ``{column: (N,)}`` of the batch's split, on the batch's device.
        kind: ``pairs`` or ``kto``.

    Returns:
        Pairs: ``{"ref_logps": (2B,)}``, chosen rows then rejected rows as in the batch. KTO: ``{"ref_logps": (B,),
        "ref_kl_logps": (B,)}``.
    """
    first, second = columns_for(kind)
    index = batch["index"].to(columns[first].device)
    if kind == "pairs":
        return {"ref_logps": torch.cat([columns[first][index], columns[second][index]])}
    return {"ref_logps": columns[first][index], "ref_kl_logps": columns[second][index]}


# ------------------------------------------------------------------------------------------------- files
def save_reference_cache(
    path: str | os.PathLike, splits: Mapping[str, Mapping[str, Tensor]], metadata: Mapping[str, Any]
) -> None:
    """Writes ``{split: {column: (N,)}}`` and ``metadata`` atomically (temporary file, fsync, rename)."""
    from safetensors.torch import save_file

    tensors = {f"{split}.{col}": t.detach().float().cpu().contiguous() for split, cols in splits.items()
               for col, t in cols.items()}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)}
    atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_reference_cache(
    path: str | os.PathLike, metadata: Mapping[str, Any], counts: Mapping[str, int], kind: str
) -> tuple[dict[str, dict[str, Tensor]] | None, str]:
    """Reads a cache file if it matches the run.

    Args:
        path: The cache file.
        metadata: The metadata the run expects (compared as JSON).
        counts: ``{split: number of examples}`` the run expects.
        kind: ``pairs`` or ``kto``.

    Returns:
        ``(splits, "")`` for a usable file, else ``(None, reason)``: missing, unreadable, other metadata, other
        tensors or counts, or non-finite values.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None, "no cache file"
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
            names = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as err:  # a truncated or overwritten file
        return None, f"unreadable ({type(err).__name__}: {err})"
    expected = json.loads(json.dumps(metadata, sort_keys=True, default=str))
    if stored != expected:
        if not isinstance(stored, dict):
            return None, "no cache metadata"
        differing = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        return None, f"stale (different {', '.join(differing)})"
    wanted = {f"{split}.{col}" for split in counts for col in columns_for(kind)}
    if names != wanted:
        return None, f"other tensors ({', '.join(sorted(names))})"
    splits: dict[str, dict[str, Tensor]] = {}
    for split, n in counts.items():
        splits[split] = {}
        for col in columns_for(kind):
            t = tensors[f"{split}.{col}"]
            if t.shape != (n,):
                return None, f"{split}.{col} has shape {tuple(t.shape)}, expected ({n},)"
            if not bool(torch.isfinite(t).all()):
                return None, f"{split}.{col} holds non-finite values"
            splits[split][col] = t
    return splits, ""
