"""P-SACPO: dialling the safety weight after training by combining the step-1 and step-2 models.

SACPO (Wachi et al., 2024) aligns a policy in two steps: step 1 for reward gives ``pi_r``, step 2 for safety with weight
``lambda`` gives ``pi_{r + lambda g}``. Both steps solve KL-regularised problems whose optimal policies are
``pi* ~ pi_ref * exp(objective / beta)``, so the log-linear (geometric) mixture of the two models over whole responses,

    pi*_q(y | x)  ~  pi_r(y | x) ** (1 - q)  *  pi_{r + lambda g}(y | x) ** q
                  ~  pi_ref(y | x) * exp((r(x, y) + q * lambda * g(x, y)) / beta),

is exactly the optimal policy for weight ``q * lambda``. That identity holds at the *sequence* level. Decoding it
directly is intractable, so :class:`sacpo_lightning.models.mixture.GeometricMixtureLM` runs the *token-level* geometric
mixture ``m(y_t | ctx) ~ pi_r(y_t | ctx) ** (1 - q) * pi_{r + lambda g}(y_t | ctx) ** q`` (renormalised at every
position, :func:`geometric_mixture_logprobs`), which approximates ``pi*_q``: the two differ by the per-token normalisers
``Z_t = sum_v pi_r(v | ctx) ** (1 - q) * pi_{r + lambda g}(v | ctx) ** q`` (:func:`geometric_mixture_log_normalizer`),
with ``pi*_q(y) / m(y) ~ prod_t Z_t(y)``, the importance weight that corrects samples of ``m`` into (self-normalised)
estimates under ``pi*_q`` (:mod:`sacpo_lightning.importance`). Running two models per token is expensive, so P-SACPO
approximates further by a linear merge in weight space, ``theta_q = (1 - q) theta_A + q theta_B``
(:func:`linear_merge_state_dicts`, :func:`merge_model_folders`). :func:`mixture_vs_merge_kl` measures how far the cheap
merge is from the token-level mixture on given texts, and :func:`merge_with_report` does both for several weights: the
one merge path of ``sacpo merge``, the pipeline's merge stage and the ``MergeOnFitEnd`` callback.

The tensor math here (:func:`linear_merge_state_dicts`, :func:`geometric_mixture_logprobs`, :func:`token_kl`) does not
depend on Lightning; the folder helpers work on plain Hugging Face folders (LoRA runs are exported with their adapters
already merged into the full weights, or as adapter chains on one base, which merge as chains).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sacpo_lightning.io import atomic_directory, atomic_write_json
from sacpo_lightning.models.chain import is_chain_folder, merge_chains
from sacpo_lightning.models.policy import load_model_folder

__all__ = [
    "KL_MAX_LENGTH",
    "MERGE_METADATA_FILE",
    "MERGE_NAME_FORMAT",
    "REPORT_FILE",
    "MergeError",
    "MixtureKL",
    "check_compatible",
    "format_report",
    "geometric_mixture_log_normalizer",
    "geometric_mixture_logprobs",
    "linear_merge_state_dicts",
    "merge_model_folders",
    "merge_with_report",
    "mixture_vs_merge_kl",
    "read_kl_prompts",
    "token_kl",
]

MERGE_METADATA_FILE = "sacpo_merge.json"
REPORT_FILE = "merge_report.json"
"""The report :func:`merge_with_report` writes beside the merges (``sacpo merge``, ``MergeOnFitEnd``)."""
MERGE_NAME_FORMAT = "merge_q{q:.2f}"
"""Folder name of the merge at weight ``q`` under an output root."""
KL_MAX_LENGTH = 512
"""Tokens a KL prompt is cut to by default (``sacpo merge --kl_max_length``, the ``MergeOnFitEnd`` callback)."""

# Config fields that must agree for a weight-space merge or a token-level mixture to make sense.
ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)
SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")

PathLike = str | os.PathLike


class MergeError(ValueError):
    """Two models (or state dicts) cannot be merged or mixed: their keys, shapes, configs or tokenizers differ."""


# ----------------------------------------------------------------------------------------------------------------------
# Tensor math
# ----------------------------------------------------------------------------------------------------------------------


def _check_q(q: float) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:  # also rejects NaN
        raise ValueError(f"q must be in [0, 1], got {q}")
    return q


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
    q = _check_q(q)
    _check_mergeable(state_a, state_b)
    return {key: _merge_tensor(a, state_b[key], q) for key, a in state_a.items()}


def _geometric_mixture(logits_a: Tensor, logits_b: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """``(log_probs, log_z)``: the token-level mixture's log-probs ``(..., V)`` and log-normalisers ``(...)``.

    ``log_z = logsumexp((1 - q) * log_softmax(a) + q * log_softmax(b))``; it is exactly 0 at ``q`` in ``{0, 1}`` (one
    normalised distribution) and ``<= 0`` otherwise (Hoelder's inequality).
    """
    q = _check_q(q)
    if logits_a.shape != logits_b.shape:
        raise MergeError(f"Logit shapes differ: A {tuple(logits_a.shape)}, B {tuple(logits_b.shape)}.")
    dtype = torch.promote_types(logits_a.dtype, torch.float32)
    logp_a = torch.log_softmax(logits_a.to(dtype), dim=-1)
    zeros = logp_a.new_zeros(logp_a.shape[:-1])
    if q == 0.0:
        return logp_a, zeros
    logp_b = torch.log_softmax(logits_b.to(dtype), dim=-1)
    if q == 1.0:
        return logp_b, zeros
    unnormalised = (1.0 - q) * logp_a + q * logp_b
    log_z = torch.logsumexp(unnormalised, dim=-1)
    return unnormalised - log_z[..., None], log_z


def geometric_mixture_logprobs(logits_a: Tensor, logits_b: Tensor, q: float) -> Tensor:
    """Log-probs of the token-level geometric mixture ``pi_A ** (1 - q) * pi_B ** q``, renormalised per position.

    This is the next-token distribution of :class:`~sacpo_lightning.models.mixture.GeometricMixtureLM`. Chained over a
    response it is *not* the sequence-level mixture ``pi_A(y) ** (1 - q) * pi_B(y) ** q`` (normalised over whole
    responses): the two differ by the product of the per-position normalisers
    (:func:`geometric_mixture_log_normalizer`).

    Args:
        logits_a: ``(..., V)`` next-token logits of model A.
        logits_b: ``(..., V)`` next-token logits of model B (same shape).
        q: Mixture weight in ``[0, 1]``.

    Returns:
        ``(..., V)`` float32 (or float64 for float64 input) log-probs, ``logsumexp == 0`` over the last axis; equal to
        ``log_softmax(logits_a)`` at ``q = 0`` and ``log_softmax(logits_b)`` at ``q = 1``.
    """
    return _geometric_mixture(logits_a, logits_b, q)[0]


def geometric_mixture_log_normalizer(logits_a: Tensor, logits_b: Tensor, q: float) -> Tensor:
    """Per-position ``log Z = log sum_v pi_A(v) ** (1 - q) * pi_B(v) ** q`` of the token-level geometric mixture.

    Summed over the tokens of a response ``y`` sampled from the token-level mixture ``m``, ``sum_t log Z_t`` is
    ``log pi*(y) - log m(y)`` up to a constant, where ``pi*(y) ~ pi_A(y) ** (1 - q) * pi_B(y) ** q`` is the
    sequence-level mixture: the importance log-weight of ``y`` for the target ``pi*``.

    Args:
        logits_a: ``(..., V)`` next-token logits of model A.
        logits_b: ``(..., V)`` next-token logits of model B (same shape).
        q: Mixture weight in ``[0, 1]``.

    Returns:
        ``(...)`` log-normalisers, ``<= 0``; exactly 0 at ``q = 0`` and ``q = 1``.
    """
    return _geometric_mixture(logits_a, logits_b, q)[1]


def token_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per position from normalised log-probs.

    Args:
        log_p: ``(..., V)`` log-probs of ``p``.
        log_q: ``(..., V)`` log-probs of ``q``.

    Returns:
        ``(...)`` KL divergences (nats); ``0 * log 0`` counts as zero.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Folder checks
# ----------------------------------------------------------------------------------------------------------------------


def _load_config_dict(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = text_config.to_dict()
    # Multimodal configs keep architectures/model_type at the top level.
    values.setdefault("architectures", config.architectures)
    values["model_type"] = config.model_type
    return values


def _load_raw_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _first_vocab_differences(vocab_a: dict[str, int], vocab_b: dict[str, int], limit: int = 5) -> str:
    diffs = []
    for token in sorted(set(vocab_a) | set(vocab_b)):
        id_a, id_b = vocab_a.get(token), vocab_b.get(token)
        if id_a != id_b:
            diffs.append(f"{token!r}: {id_a} vs {id_b}")
            if len(diffs) == limit:
                break
    return "; ".join(diffs)


def check_compatible(dir_a: PathLike, dir_b: PathLike) -> None:
    """Refuses two model folders that cannot be merged in weight space or mixed token by token.

    Compares the config fields in :data:`ARCHITECTURE_FIELDS` (architecture, model type, sizes, number of layers,
    vocabulary size, embedding tying) and the tokenizers: the full token-to-id map (``get_vocab()``), the special
    token ids and the chat template.

    Raises:
        MergeError: With both folders and the first differing field in the message.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    where = f"{dir_a} (A) and {dir_b} (B)"
    config_a, config_b = _load_config_dict(dir_a), _load_config_dict(dir_b)
    for field in ARCHITECTURE_FIELDS:
        value_a, value_b = config_a.get(field), config_b.get(field)
        if value_a != value_b:
            raise MergeError(
                f"Models {where} have different architectures: config field {field!r} is {value_a!r} in A and "
                f"{value_b!r} in B."
            )
    tok_a, tok_b = _load_raw_tokenizer(dir_a), _load_raw_tokenizer(dir_b)
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        raise MergeError(
            f"Models {where} have different tokenizers: the vocabularies differ ({len(vocab_a)} vs {len(vocab_b)} "
            f"tokens; first differences: {_first_vocab_differences(vocab_a, vocab_b)})."
        )
    for field in SPECIAL_TOKEN_FIELDS:
        value_a, value_b = getattr(tok_a, field, None), getattr(tok_b, field, None)
        # A pad token only fills unused positions: one side lacking it (an export adds one) is compatible.
        if field == "pad_token_id" and (value_a is None or value_b is None):
            continue
        if value_a != value_b:
            raise MergeError(
                f"Models {where} have different tokenizers: {field} is {value_a!r} in A and {value_b!r} in B."
            )
    specials_a = dict(zip(tok_a.all_special_tokens, tok_a.all_special_ids, strict=True))
    specials_b = dict(zip(tok_b.all_special_tokens, tok_b.all_special_ids, strict=True))
    if specials_a != specials_b:
        raise MergeError(
            f"Models {where} have different tokenizers: special tokens are {specials_a} in A and {specials_b} in B."
        )
    template_a, template_b = getattr(tok_a, "chat_template", None), getattr(tok_b, "chat_template", None)
    if template_a != template_b:
        raise MergeError(f"Models {where} have different tokenizers: the chat templates differ.")


# ----------------------------------------------------------------------------------------------------------------------
# Weight-space merge of two folders
# ----------------------------------------------------------------------------------------------------------------------


def _load_causal_lm(path: PathLike, dtype: str | torch.dtype | None):
    """A model folder (full weights, or an adapter chain merged on load) in ``dtype`` (None: as saved)."""
    return load_model_folder(str(path), dtype)


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
        raise ValueError(f"Output folders are not distinct: {[str(d) for d in dirs]} (check name_format).")
    return dirs


def _merge_chain_folders(dir_a: Path, dir_b: Path, q_values: Sequence[float], dirs: Sequence[Path]) -> None:
    """Adapter exports on one base: each merge is a chain with scaled adapters, no full weights written."""
    for q, out_dir in zip(q_values, dirs, strict=True):
        with atomic_directory(out_dir) as tmp:
            links = merge_chains(dir_a, dir_b, q, tmp)
            atomic_write_json(tmp / MERGE_METADATA_FILE, {
                "kind": "adapter_merge", "base": str(dir_a.resolve()), "other": str(dir_b.resolve()), "q": q,
                "formula": "(1 - q) * base + q * other, as adapter scales on one base model", "links": links})


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
    model_a = _load_causal_lm(dir_a, dtype)
    model_b = _load_causal_lm(dir_b, model_a.dtype)
    target = model_a.state_dict()
    state_b = model_b.state_dict()
    del model_b
    _check_mergeable(target, state_b)
    # Tied parameters appear under several keys with one storage: keep one copy of A's original values for them.
    state_a = _original_tensors(target)
    tokenizer = _load_raw_tokenizer(dir_a)
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
    q_values = [_check_q(q) for q in q_values]
    dirs = _merge_output_dirs(q_values, output_dirs, output_root, name_format)
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    if check:
        check_compatible(dir_a, dir_b)
    if is_chain_folder(dir_a) and is_chain_folder(dir_b):
        _merge_chain_folders(dir_a, dir_b, q_values, dirs)
    else:
        _merge_full_weights(dir_a, dir_b, q_values, dirs, dtype)
    return dirs


# ----------------------------------------------------------------------------------------------------------------------
# Mixture vs merge
# ----------------------------------------------------------------------------------------------------------------------


class MixtureKL(NamedTuple):
    """Result of :func:`mixture_vs_merge_kl`."""

    mean_kl: float
    """Mean per-token ``KL(mixture || merged)`` in nats."""
    num_tokens: int
    """Number of positions averaged over."""


@torch.no_grad()
def mixture_vs_merge_kl(
    dir_a: PathLike,
    dir_b: PathLike,
    merged_dir: PathLike,
    q: float,
    prompts: Sequence[str],
    tokenizer=None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    device: str | torch.device | None = None,
) -> MixtureKL:
    """How far a weight-space merge is from the token-level geometric mixture, measured on given texts.

    Each text is tokenized (with the tokenizer's special tokens, right-padded) and both the token-level mixture
    ``GeometricMixtureLM(A, B, q)`` and the merged model are run teacher-forced over it. At every real (non-padding)
    position ``t`` the next-token distributions are compared with ``KL(mixture(. | x_<=t) || merged(. | x_<=t))``;
    the result is the mean over all positions of all texts. No tokens are generated. The value is 0 when the merged
    model is A at ``q = 0`` or B at ``q = 1``, and grows as the merge departs from the token-level mixture. It does not
    measure the distance to the sequence-level mixture (see
    :class:`~sacpo_lightning.models.mixture.GeometricMixtureLM`).

    Args:
        dir_a: The ``q = 0`` folder (step-1 model).
        dir_b: The ``q = 1`` folder (step-2 model).
        merged_dir: The merged folder to evaluate (e.g. from :func:`merge_model_folders` with the same ``q``).
        q: Mixture weight in ``[0, 1]``.
        prompts: Texts to score (prompts, or prompts with responses).
        tokenizer: Tokenizer shared by the models; loaded from ``dir_a`` when omitted.
        batch_size: Texts per forward pass.
        max_length: Truncate texts to this many tokens.
        dtype: Dtype the three models are loaded in (float32 by default, for an accurate KL).
        device: Device to run on (CPU when omitted).

    Returns:
        ``MixtureKL(mean_kl, num_tokens)``.
    """
    from sacpo_lightning.models.mixture import GeometricMixtureLM

    q = _check_q(q)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one text to score.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer is None:
        from sacpo_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(str(dir_a))
    check_compatible(dir_a, merged_dir)
    mixture = GeometricMixtureLM.from_folders(dir_a, dir_b, q, dtype=dtype, device=device)
    merged = _load_causal_lm(merged_dir, dtype).eval()
    if device is not None:
        merged = merged.to(device)
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=max_length is not None,
            max_length=max_length,
        ).to(mixture.device)
        mask = batch["attention_mask"]
        log_mix = mixture(batch["input_ids"], attention_mask=mask).logits
        log_merged = torch.log_softmax(merged(**batch, use_cache=False).logits.float(), dim=-1)
        kl = token_kl(log_mix, log_merged.to(log_mix.dtype))
        total += float(kl.masked_fill(mask == 0, 0.0).double().sum())
        count += int(mask.sum())
    return MixtureKL(mean_kl=total / count if count else math.nan, num_tokens=count)


# ----------------------------------------------------------------------------------------------------------------------
# Merging with a report
# ----------------------------------------------------------------------------------------------------------------------


def read_kl_prompts(path: PathLike, max_prompts: int | None = None) -> list[str]:
    """The first ``max_prompts`` prompts of a prompt set, for :func:`merge_with_report`.

    The file is read by :func:`sacpo_lightning.evaluation.generation.load_prompts` (a JSON list or JSON lines of
    ``{"prompt": ..., "category": ...}`` objects, the format of the shared evaluation sets).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: ``max_prompts < 1``, or a malformed or empty prompt set (the message names the file and row).
    """
    from sacpo_lightning.evaluation.generation import load_prompts

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    prompts = [row["prompt"] for row in load_prompts(path)]
    return prompts if max_prompts is None else prompts[:max_prompts]


def _kl_texts(prompts: Sequence[str], tokenizer) -> list[str]:
    """Each prompt as a user turn of the chat template with the assistant header (plain text without a template).

    The KL is so measured where a response would start. A BOS written by the template is dropped when the tokenizer
    adds one itself, so it is not doubled.
    """
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    from sacpo_lightning.data.tokenization import tokenizer_adds_bos
    from sacpo_lightning.evaluation.generation import format_prompt

    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else None
    texts = [format_prompt(tokenizer, prompt, "chat") for prompt in prompts]
    return [text[len(bos) :] if bos and text.startswith(bos) else text for text in texts]


def _report_texts(base: Path, prompts: Sequence[str], tokenizer) -> tuple[Any, list[str]]:
    """``(tokenizer, KL texts)``: the tokenizer loaded from ``base`` when None, and the prompts as chat turns."""
    if tokenizer is None:
        from sacpo_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(str(base))
    return tokenizer, _kl_texts(prompts, tokenizer)


def _report_entry(
    base: Path,
    other: Path,
    q: float,
    path: Path,
    texts: list[str] | None,
    tokenizer,
    *,
    batch_size: int,
    max_length: int | None,
    device: str | torch.device | None,
    lam: float | None,
) -> dict[str, Any]:
    """One merge's report entry: its KL to the token-level mixture on ``texts`` (None without texts)."""
    kl = num_tokens = None
    if texts:
        result = mixture_vs_merge_kl(
            base, other, path, q, texts, tokenizer, batch_size=batch_size, max_length=max_length, device=device
        )
        kl, num_tokens = result.mean_kl, result.num_tokens
    entry = {"q": float(q), "path": str(path), "kl_mixture_vs_merge": kl, "num_tokens": num_tokens}
    if lam is not None:
        entry["lam_effective"] = float(q) * float(lam)
    return entry


def merge_with_report(
    base: PathLike,
    other: PathLike,
    weights: Sequence[float],
    *,
    output_root: PathLike | None = None,
    output_dirs: Sequence[PathLike] | None = None,
    dtype: str | None = None,
    prompts: Sequence[str] | None = None,
    tokenizer=None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    lam: float | None = None,
    report_file: PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the merges ``(1 - q) * base + q * other`` and reports each one's distance to the token-level mixture.

    The merges are written by :func:`merge_model_folders` (``output_root/merge_q{q:.2f}``, or one folder per weight
    in ``output_dirs``); with ``prompts``, :func:`mixture_vs_merge_kl` then measures the mean per-token
    ``KL(token-level mixture || merge)`` of each merge on the prompts, each rendered as a user turn of the tokenizer's
    chat template with the assistant header.

    Args:
        base: The ``q = 0`` folder (the step-1 model).
        other: The ``q = 1`` folder (a step-2 model).
        weights: Merge weights, each in ``[0, 1]``.
        output_root: Folder that receives ``merge_q{q:.2f}`` per weight. Exclusive with ``output_dirs``.
        output_dirs: One output folder per weight.
        dtype: Dtype the merges are loaded and saved in; ``None`` keeps the base's.
        prompts: Prompts (plain, see :func:`read_kl_prompts`) on which to measure the KL; no KL when empty or ``None``.
        tokenizer: Tokenizer for the KL texts; loaded from ``base`` when omitted.
        batch_size: Texts per forward pass for the KL.
        max_length: Truncate the texts to this many tokens for the KL.
        device: Device for the KL forward passes (CPU when ``None``).
        lam: The step-2 safety weight; each entry then also gets ``lam_effective = q * lam``.
        report_file: Where to write the report (atomically); not written when ``None``.
        extra: More top-level fields for the report (e.g. the prompt file, the training step).

    Returns:
        ``{"base", "other", "dtype", "num_prompts", "merges": [{"q", "path", "kl_mixture_vs_merge", "num_tokens"}],
        **extra}``, the entries with ``lam_effective`` when ``lam`` is given; the KL fields are ``None`` without
        prompts.

    Raises:
        MergeError: The models cannot be merged.
        ValueError: A weight outside ``[0, 1]``, weights that name the same folder, or bad output arguments.
    """
    base, other = Path(base), Path(other)
    paths = merge_model_folders(base, other, weights, output_dirs, output_root=output_root, dtype=dtype)
    texts = None
    if prompts:
        tokenizer, texts = _report_texts(base, prompts, tokenizer)
    entries = [
        _report_entry(base, other, q, path, texts, tokenizer, batch_size=batch_size, max_length=max_length,
                      device=device, lam=lam)
        for q, path in zip(weights, paths, strict=True)
    ]
    report = {
        "base": str(base.resolve()),
        "other": str(other.resolve()),
        "dtype": dtype,
        "num_prompts": len(prompts) if prompts else 0,
        "merges": entries,
        **(extra or {}),
    }
    if report_file is not None:
        atomic_write_json(report_file, report)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """A small text table of a report's merges (``lam_effective`` shown when the entries have it)."""
    entries = report["merges"]
    with_lam = any("lam_effective" in entry for entry in entries)
    header = ["q"] + (["lam_eff"] if with_lam else []) + ["KL(mix||merge)", "tokens", "path"]
    rows = []
    for entry in entries:
        kl = entry.get("kl_mixture_vs_merge")
        row = [f"{entry['q']:.4g}"]
        if with_lam:
            lam = entry.get("lam_effective")
            row.append("-" if lam is None else f"{lam:.4g}")
        tokens = entry.get("num_tokens")
        row += ["-" if kl is None else f"{kl:.6f}", "-" if tokens is None else str(tokens), entry["path"]]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in [header, *rows]
    )
