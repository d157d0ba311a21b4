"""P-SACPO's weight-space merge: ``theta_q = (1 - q) theta_A + q theta_B`` for state dicts and model folders.

SACPO (Wachi et al., 2024) aligns a policy in two steps: step 1 for reward gives ``pi_r``, step 2 for safety with weight
``lambda`` gives ``pi_{r + lambda g}``. The geometric mixture of the two at weight ``q`` is the optimal policy for the
safety weight ``q * lambda`` (:mod:`sacpo_lightning.models.mixture`); running two models per token is expensive, so
P-SACPO approximates it by a linear merge in weight space (:func:`linear_merge_state_dicts`,
:func:`merge_model_folders`). How far a merge is from the token-level mixture is :mod:`sacpo_lightning.merge_kl`;
writing merges with that measurement is :mod:`sacpo_lightning.merge_report`, the one merge path of ``sacpo merge``, the
pipeline's merge stage and the ``MergeOnFitEnd`` callback.

The tensor math (:func:`linear_merge_state_dicts`) does not depend on Lightning; the folder merges work on plain Hugging
Face folders (LoRA runs are exported with their adapters already merged into the full weights, or as adapter chains on
one base, which merge as chains).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from sacpo_lightning.errors import UserError
from sacpo_lightning.io import PathLike, atomic_directory, atomic_write_json
from sacpo_lightning.merge_weight import check_q
from sacpo_lightning.models.card import MERGE_FILE, write_model_card
from sacpo_lightning.models.chain import is_chain_folder, merge_chains
from sacpo_lightning.models.compat import MergeError, check_compatible
from sacpo_lightning.models.policy import load_model_folder
from sacpo_lightning.models.tokenizer import load_raw_tokenizer

__all__ = [
    "MERGE_METADATA_FILE",
    "MERGE_NAME_FORMAT",
    "linear_merge_state_dicts",
    "merge_model_folders",
]

MERGE_METADATA_FILE = MERGE_FILE
MERGE_NAME_FORMAT = "merge_q{q:.2f}"
"""Folder name of the merge at weight ``q`` under an output root."""


# ----------------------------------------------------------------------------------------------------------------------
# Tensor math
# ----------------------------------------------------------------------------------------------------------------------


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_mergeable(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor]) -> None:
    """Raises :class:`MergeError` naming the first keys, shapes or dtypes that differ."""
    only_a = [k for k in state_a if k not in state_b]
    only_b = [k for k in state_b if k not in state_a]
    if only_a or only_b:
        raise MergeError(
            f"State dicts have different keys: only in A: [{_preview(only_a)}]; only in B: [{_preview(only_b)}]."
        )
    for key, a in state_a.items():
        b = state_b[key]
        if a.shape != b.shape:
            raise MergeError(f"Shape mismatch for {key!r}: A has {tuple(a.shape)}, B has {tuple(b.shape)}.")
        if a.dtype != b.dtype:
            raise MergeError(f"Dtype mismatch for {key!r}: A has {a.dtype}, B has {b.dtype}; load both in one dtype.")
        if not a.is_floating_point() and not torch.equal(a, b.to(a.device)):
            raise MergeError(f"Non-floating tensor {key!r} differs between A and B; it cannot be interpolated.")


def _merge_tensor(a: Tensor, b: Tensor, q: float) -> Tensor:
    if q == 0.0 or not a.is_floating_point():
        return a.detach().clone()
    if q == 1.0:
        return b.detach().to(a.device).clone()
    merged = torch.lerp(a.detach().float(), b.detach().to(a.device).float(), q)
    return merged.to(a.dtype)


def linear_merge_state_dicts(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], q: float
) -> dict[str, Tensor]:
    """Linear interpolation of two state dicts: ``theta = (1 - q) * theta_A + q * theta_B``.

    Each floating tensor is interpolated in float32 and cast back to its own dtype; ``q = 0`` returns copies of A's
    tensors bit for bit and ``q = 1`` copies of B's. Non-floating tensors (index buffers, counters) must be equal in
    both and are copied from A.

    Args:
        state_a: The base state dict (``q = 0``), e.g. the step-1 (reward-aligned) model.
        state_b: The other state dict (``q = 1``), e.g. a step-2 (safety-aligned) model; same keys, shapes and dtypes.
        q: Interpolation weight in ``[0, 1]``.

    Returns:
        A new state dict (fresh tensors, on A's devices) with A's key order.

    Raises:
        ValueError: ``q`` is outside ``[0, 1]``.
        MergeError: Keys, shapes or dtypes differ, or a non-floating tensor differs.
    """
    q = check_q(q)
    _check_mergeable(state_a, state_b)
    return {key: _merge_tensor(a, state_b[key], q) for key, a in state_a.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Weight-space merge of two folders
# ----------------------------------------------------------------------------------------------------------------------


def _merge_output_dirs(
    q_values: Sequence[float],
    output_dirs: Sequence[PathLike] | None,
    output_root: PathLike | None,
    name_format: str,
) -> list[Path]:
    if (output_dirs is None) == (output_root is None):
        raise ValueError("Pass exactly one of output_dirs (one folder per q) or output_root (folders named by q).")
    if output_dirs is not None:
        if len(output_dirs) != len(q_values):
            raise ValueError(f"Got {len(q_values)} q values but {len(output_dirs)} output folders.")
        dirs = [Path(d) for d in output_dirs]
    else:
        dirs = [Path(output_root) / name_format.format(q=q) for q in q_values]
    resolved = [d.resolve() for d in dirs]
    if len(set(resolved)) != len(resolved):
        raise UserError(f"Output folders are not distinct: {[str(d) for d in dirs]} (check name_format).")
    return dirs


def _merge_chain_folders(dir_a: Path, dir_b: Path, q_values: Sequence[float], dirs: Sequence[Path]) -> None:
    """Adapter exports on one base: each merge is a chain with scaled adapters, no full weights written."""
    for q, out_dir in zip(q_values, dirs, strict=True):
        with atomic_directory(out_dir) as tmp:
            links = merge_chains(dir_a, dir_b, q, tmp)
            atomic_write_json(tmp / MERGE_METADATA_FILE, {
                "kind": "adapter_merge", "base": str(dir_a.resolve()), "other": str(dir_b.resolve()), "q": q,
                "formula": "(1 - q) * base + q * other, as adapter scales on one base model", "links": links})
            write_model_card(tmp)


def _original_tensors(target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of each tensor of ``target``; tied parameters (several keys, one storage) share one copy."""
    originals: dict[tuple[int, int, tuple[int, ...]], Tensor] = {}
    state = {}
    for key, tensor in target.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in originals:
            originals[ident] = tensor.detach().clone()
        state[key] = originals[ident]
    return state


@torch.no_grad()
def _merge_full_weights(
    dir_a: Path, dir_b: Path, q_values: Sequence[float], dirs: Sequence[Path], dtype: str | torch.dtype | None
) -> None:
    """Full-weight folders: each merge is written into A's module and saved with A's config and tokenizer."""
    model_a = load_model_folder(str(dir_a), dtype)
    model_b = load_model_folder(str(dir_b), model_a.dtype)
    target = model_a.state_dict()
    state_b = model_b.state_dict()
    del model_b
    _check_mergeable(target, state_b)
    # Tied parameters appear under several keys with one storage: keep one copy of A's original values for them.
    state_a = _original_tensors(target)
    tokenizer = load_raw_tokenizer(dir_a)
    saved_dtype = str(model_a.dtype).removeprefix("torch.")
    for q, out_dir in zip(q_values, dirs, strict=True):
        for key, tensor in target.items():
            tensor.copy_(_merge_tensor(state_a[key], state_b[key], q))
        with atomic_directory(out_dir) as tmp:
            model_a.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            metadata = {
                "kind": "linear_merge",
                "base": str(dir_a.resolve()),
                "other": str(dir_b.resolve()),
                "q": q,
                "formula": "(1 - q) * base + q * other, float32 arithmetic",
                "dtype": saved_dtype,
            }
            atomic_write_json(tmp / MERGE_METADATA_FILE, metadata)
            write_model_card(tmp)


@torch.no_grad()
def merge_model_folders(
    dir_a: PathLike,
    dir_b: PathLike,
    q_values: Sequence[float],
    output_dirs: Sequence[PathLike] | None = None,
    *,
    output_root: PathLike | None = None,
    name_format: str = MERGE_NAME_FORMAT,
    dtype: str | torch.dtype | None = None,
    check: bool = True,
) -> list[Path]:
    """Writes ``(1 - q) * A + q * B`` for each ``q`` as a Hugging Face folder.

    A is loaded with ``AutoModelForCausalLM`` (so sharded checkpoints, renamed keys and tied embeddings are handled
    by ``from_pretrained``/``save_pretrained``), B's state dict is loaded the same way, and for each ``q`` the merged
    weights are copied into A's module and saved with A's config, generation config and tokenizer. Each folder is
    written atomically (:func:`sacpo_lightning.io.atomic_directory`) and holds a ``sacpo_merge.json`` describing the
    merge. The output is deterministic: the same inputs give the same bytes. Peak memory is about three copies of
    the model (A's original weights, B, and the merged module).

    Args:
        dir_a: The base folder (``q = 0``), e.g. the step-1 (reward-aligned) export.
        dir_b: The other folder (``q = 1``), e.g. a step-2 (safety-aligned) export.
        q_values: Merge weights, each in ``[0, 1]``.
        output_dirs: One output folder per ``q``. Exclusive with ``output_root``.
        output_root: Folder under which the outputs are named with ``name_format``.
        name_format: ``str.format`` pattern with a ``q`` field, used with ``output_root``.
        dtype: Dtype to load and save the weights in (``"bfloat16"``, ``torch.float32``, ...); ``None`` keeps A's
            checkpoint dtype (B is loaded in the same dtype). Interpolation itself always runs in float32.
        check: Run :func:`check_compatible` first.

    Returns:
        The output folders, in the order of ``q_values``.

    Raises:
        ValueError: A ``q`` outside ``[0, 1]`` or bad output folder arguments.
        MergeError: The folders are incompatible.
    """
    q_values = [check_q(q) for q in q_values]
    dirs = _merge_output_dirs(q_values, output_dirs, output_root, name_format)
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    if check:
        check_compatible(dir_a, dir_b)
    if is_chain_folder(dir_a) and is_chain_folder(dir_b):
        _merge_chain_folders(dir_a, dir_b, q_values, dirs)
    else:
        _merge_full_weights(dir_a, dir_b, q_values, dirs, dtype)
    return dirs
