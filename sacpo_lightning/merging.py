"""P-SACPO: dialling the safety weight after training by combining the step-1 and step-2 models.

SACPO (Wachi et al., 2024) aligns a policy in two steps: step 1 for reward gives ``pi_r``, step 2 for safety with weight
``lambda`` gives ``pi_{r + lambda g}``. Both steps solve KL-regularised problems whose optimal policies are
``pi* ~ pi_ref * exp(objective / beta)``, so the log-linear (geometric) mixture of the two models over whole responses,

    pi*_q(y | x)  ~  pi_r(y | x) ** (1 - q)  *  pi_{r + lambda g}(y | x) ** q
                  ~  pi_ref(y | x) * exp((r(x, y) + q * lambda * g(x, y)) / beta),

is exactly the optimal policy for weight ``q * lambda``. That identity holds at the *sequence* level. Decoding it
directly is intractable, so :class:`GeometricMixtureLM` runs the *token-level* geometric mixture
``m(y_t | ctx) ~ pi_r(y_t | ctx) ** (1 - q) * pi_{r + lambda g}(y_t | ctx) ** q`` (renormalised at every position),
which approximates ``pi*_q``: the two differ by the per-token normalisers
``Z_t = sum_v pi_r(v | ctx) ** (1 - q) * pi_{r + lambda g}(v | ctx) ** q``, with ``pi*_q(y) / m(y) ~ prod_t Z_t(y)``.
:meth:`GeometricMixtureLM.generate` can return ``log W(y) = sum_t log Z_t``, the importance log-weight that corrects
samples of ``m`` into (self-normalised) estimates under ``pi*_q`` (:mod:`sacpo_lightning.importance`). Running two
models per token is expensive, so P-SACPO approximates further by a linear merge in weight space,
``theta_q = (1 - q) theta_A + q theta_B`` (:func:`linear_merge_state_dicts`, :func:`merge_model_folders`).
:func:`mixture_vs_merge_kl` measures how far the cheap merge is from the token-level mixture on given texts.

The tensor math here (:func:`linear_merge_state_dicts`, :func:`geometric_mixture_logprobs`, :func:`token_kl`) does not
depend on Lightning; the folder helpers work on plain Hugging Face folders (LoRA runs are exported with their adapters
already merged into the full weights, which is what is merged here).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from sacpo_lightning.io import atomic_directory, atomic_write_json
from sacpo_lightning.models.chain import is_chain_folder, merge_chains
from sacpo_lightning.models.policy import load_model_folder

__all__ = [
    "MERGE_METADATA_FILE",
    "GeometricMixtureLM",
    "MergeError",
    "MixtureKL",
    "MixtureSamples",
    "check_compatible",
    "check_unmodified_sampling",
    "geometric_mixture_log_normalizer",
    "geometric_mixture_logprobs",
    "linear_merge_state_dicts",
    "merge_model_folders",
    "mixture_vs_merge_kl",
    "token_kl",
]

MERGE_METADATA_FILE = "sacpo_merge.json"

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

    This is the next-token distribution of :class:`GeometricMixtureLM`. Chained over a response it is *not* the
    sequence-level mixture ``pi_A(y) ** (1 - q) * pi_B(y) ** q`` (normalised over whole responses): the two differ by
    the product of the per-position normalisers (:func:`geometric_mixture_log_normalizer`).

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


@torch.no_grad()
def merge_model_folders(
    dir_a: PathLike,
    dir_b: PathLike,
    q_values: Sequence[float],
    output_dirs: Sequence[PathLike] | None = None,
    *,
    output_root: PathLike | None = None,
    name_format: str = "merge_q{q:.2f}",
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
        # Adapter exports on one base: the merge is a chain with scaled adapters, no full weights written.
        for q, out_dir in zip(q_values, dirs, strict=True):
            with atomic_directory(out_dir) as tmp:
                links = merge_chains(dir_a, dir_b, q, tmp)
                atomic_write_json(tmp / MERGE_METADATA_FILE, {
                    "kind": "adapter_merge", "base": str(dir_a.resolve()), "other": str(dir_b.resolve()), "q": q,
                    "formula": "(1 - q) * base + q * other, as adapter scales on one base model", "links": links})
        return dirs
    model_a = _load_causal_lm(dir_a, dtype)
    model_b = _load_causal_lm(dir_b, model_a.dtype)
    target = model_a.state_dict()
    state_b = model_b.state_dict()
    del model_b
    _check_mergeable(target, state_b)
    # Tied parameters appear under several keys with one storage: keep one copy of A's original values for them.
    originals: dict[tuple[int, int, tuple[int, ...]], Tensor] = {}
    state_a = {}
    for key, tensor in target.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in originals:
            originals[ident] = tensor.detach().clone()
        state_a[key] = originals[ident]
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
    return dirs


# ----------------------------------------------------------------------------------------------------------------------
# Token-level geometric mixture (with the importance weights of the sequence-level one)
# ----------------------------------------------------------------------------------------------------------------------


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument (and output field): ``cache`` in current ``transformers``, else the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keeps the smallest set of tokens whose probability reaches ``top_p`` (at least one); others get ``-inf``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


class MixtureSamples(NamedTuple):
    """Result of ``GeometricMixtureLM.generate(..., return_log_weights=True)``."""

    sequences: Tensor
    """``(B, S + T)`` prompt and generated ids, as ``generate`` returns them by default."""
    log_weights: Tensor
    """``(B,)`` float64 ``log W = sum_t log Z_t`` over each row's generated tokens up to and including its EOS."""


def check_unmodified_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """Refuses decoding settings under which ``log W`` is not the importance weight for the sequence-level mixture.

    ``sum_t log Z_t`` corrects samples of the token-level mixture itself; greedy, tempered or nucleus decoding draws
    from another distribution, whose density ratio to the target is not ``W``.

    Raises:
        ValueError: Naming each offending setting (argument and CLI option) and the value it needs.
    """
    problems = []
    if not do_sample:
        problems.append("do_sample=True (--do_sample), not greedy decoding")
    if temperature != 1.0:
        problems.append(f"temperature=1 (--temperature 1), got {temperature:g}")
    if top_p != 1.0:
        problems.append(f"top_p=1 (--top_p 1), got {top_p:g}")
    if problems:
        raise ValueError(
            "Sequence-level mixture estimates (return_log_weights / --sequence_level true) need plain sampling from "
            "the token-level mixture, since only then is sum_t log Z_t the importance log-weight: set "
            + "; ".join(problems) + "."
        )


class GeometricMixtureLM(torch.nn.Module):
    """Token-level geometric mixture of two causal LMs that share a tokenizer.

    Next-token log-probs are ``log_softmax((1 - q) * log_softmax(logits_A) + q * log_softmax(logits_B))``, i.e. the
    geometric mixture renormalised at every position. With A the step-1 policy ``pi_r`` and B the step-2 policy
    ``pi_{r + lambda g}`` (both from the same reference), the *sequence-level* mixture
    ``pi*(y) ~ pi_A(y) ** (1 - q) * pi_B(y) ** q`` is the optimal policy for safety weight ``q * lambda`` (SACPO,
    Wachi et al. 2024); this token-level mixture ``m`` approximates it, and :func:`merge_model_folders` approximates it
    further in weight space. The gap is the per-token normaliser ``Z_t``: ``pi*(y) / m(y) ~ prod_t Z_t(y)``, which
    :meth:`generate` returns as ``log W`` on request, so that expectations under ``pi*`` can be estimated by
    self-normalised importance sampling (:mod:`sacpo_lightning.importance`). A model whose weight is zero is not run
    at all, so ``q = 0`` is exactly model A and ``q = 1`` exactly model B (and then ``m = pi*``, ``log W = 0``).

    Args:
        model_a: The ``q = 0`` causal LM.
        model_b: The ``q = 1`` causal LM (same vocabulary, same device).
        q: Mixture weight in ``[0, 1]``.
    """

    def __init__(self, model_a: torch.nn.Module, model_b: torch.nn.Module, q: float) -> None:
        super().__init__()
        self.model_a = model_a
        self.model_b = model_b
        self.q = q

    @property
    def q(self) -> float:
        return self._q

    @q.setter
    def q(self, value: float) -> None:
        self._q = _check_q(value)

    @property
    def config(self):
        """Model A's config (vocabulary, special ids), for code that reads ``model.config``."""
        return self.model_a.config

    @property
    def device(self) -> torch.device:
        return next(self.model_a.parameters()).device

    @classmethod
    def from_folders(
        cls,
        dir_a: PathLike,
        dir_b: PathLike,
        q: float,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        check: bool = True,
    ) -> GeometricMixtureLM:
        """Loads both models (in eval mode) from Hugging Face folders, after :func:`check_compatible` by default."""
        if check:
            check_compatible(dir_a, dir_b)
        model_a = _load_causal_lm(dir_a, dtype)
        model_b = _load_causal_lm(dir_b, model_a.dtype if dtype is None else dtype)
        mixture = cls(model_a, model_b, q).eval()
        return mixture if device is None else mixture.to(device)

    def _active(self) -> list[torch.nn.Module]:
        if self.q == 0.0:
            return [self.model_a]
        if self.q == 1.0:
            return [self.model_b]
        return [self.model_a, self.model_b]

    def _combine(self, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(log_probs (..., V), log_z (...))`` of the token-level mixture from the active models' logits."""
        if len(logits) == 1:
            logp = torch.log_softmax(logits[0].to(torch.promote_types(logits[0].dtype, torch.float32)), dim=-1)
            return logp, logp.new_zeros(logp.shape[:-1])
        return _geometric_mixture(logits[0], logits[1], self.q)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        **model_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Teacher-forced mixture log-probs.

        Args:
            input_ids: ``(B, S)`` token ids.
            attention_mask: ``(B, S)`` mask, passed to both models unchanged.
            **model_kwargs: Other arguments for both models' forward (e.g. ``position_ids``); caching is turned off
                (use :meth:`generate` to decode).

        Returns:
            An output whose ``logits`` are ``(B, S, V)`` float32 normalised log-probs of the token-level mixture, so
            code that applies ``log_softmax`` to logits gets the same values back.
        """
        for key in ("cache", "past_key_values", "labels"):
            if model_kwargs.pop(key, None) is not None:
                raise ValueError(f"GeometricMixtureLM.forward does not take {key}; use generate() to decode.")
        model_kwargs.pop("use_cache", None)
        logits = [
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs).logits
            for model in self._active()
        ]
        return CausalLMOutputWithPast(logits=self._combine(logits)[0])

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        return_log_weights: bool = False,
    ) -> Tensor | MixtureSamples:
        """Decodes from the token-level mixture with one KV cache per model.

        Left-padded batches are supported: positions come from the attention mask (``cumsum - 1``), as in
        ``transformers``' ``generate``, so greedy decoding at ``q = 0`` reproduces model A's own greedy ``generate``.
        Rows that emit an EOS are filled with ``pad_token_id`` afterwards; decoding stops when every row has ended.

        With ``return_log_weights`` each row also gets ``log W = sum_t log Z_t`` over its generated tokens, up to and
        including its first EOS (the padding after it does not count), where ``Z_t`` is the normaliser of the
        token-level mixture at step ``t`` (:func:`geometric_mixture_log_normalizer`). For a sample ``y`` of the
        token-level mixture ``m``, ``log W(y) = log pi*(y) - log m(y) + const`` with
        ``pi*(y) ~ pi_A(y) ** (1 - q) * pi_B(y) ** q`` the sequence-level mixture, so self-normalised weights
        ``softmax(log W)`` over several samples of one prompt turn averages over ``m`` into estimates under ``pi*``.
        This holds only for plain sampling from ``m`` (``do_sample=True``, ``temperature=1``, ``top_p=1``); other
        settings are refused. A row cut at ``max_new_tokens`` without an EOS is a prefix: its weight targets the
        geometric mixture of the two models' distributions over responses truncated to ``max_new_tokens`` tokens
        (``pi_A(prefix) ** (1 - q) * pi_B(prefix) ** q``), which equals ``pi*`` only when responses end in time.

        Args:
            input_ids: ``(B, S)`` prompt ids, left-padded.
            attention_mask: ``(B, S)`` mask (1 for tokens, 0 for padding); all ones when omitted.
            max_new_tokens: Maximum number of tokens to add.
            do_sample: Sample instead of taking the arg-max.
            temperature: Divides the mixture log-probs before sampling (``> 0``).
            top_p: Nucleus-sampling mass in ``(0, 1]``.
            eos_token_id: One id or several; defaults to model A's config.
            pad_token_id: Filler after EOS; defaults to the first EOS id (or 0 when there is none).
            generator: Random generator for sampling.
            return_log_weights: Also return the ``(B,)`` float64 importance log-weights ``log W`` (all 0 at ``q`` in
                ``{0, 1}``).

        Returns:
            ``(B, S + T)`` ids: the prompts followed by ``T <= max_new_tokens`` generated tokens; with
            ``return_log_weights``, ``MixtureSamples(sequences, log_weights)``.

        Raises:
            ValueError: Bad sampling settings, or ``return_log_weights`` with greedy, tempered or nucleus decoding.
        """
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if return_log_weights:
            check_unmodified_sampling(do_sample, temperature, top_p)
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        eos = _eos_tensor(eos_token_id, device)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos is not None else 0

        models = self._active()
        cache_args = [_cache_argument(model) for model in models]
        caches: list[Any] = [None] * len(models)
        sequences = input_ids
        step_ids = input_ids
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        # float64: a long response sums hundreds of per-token terms.
        log_weights = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=device)
        for _ in range(max_new_tokens):
            position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            position_ids = position_ids[:, -step_ids.shape[1] :]
            logits = []
            for i, model in enumerate(models):
                out = model(
                    input_ids=step_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_args[i]: caches[i]},
                )
                caches[i] = getattr(out, cache_args[i])
                logits.append(out.logits[:, -1, :])
            logprobs, log_z = self._combine(logits)
            if do_sample:
                scores = logprobs / temperature
                if top_p < 1:
                    scores = _top_p_filter(scores, top_p)
                next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
            else:
                next_tokens = logprobs.argmax(dim=-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            # This step's token is part of the response (the EOS included) only for rows that had not ended yet.
            log_weights += torch.where(unfinished, log_z.to(torch.float64), 0.0)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
            step_ids = next_tokens[:, None]
            if eos is not None:
                unfinished &= ~torch.isin(next_tokens, eos)
                if not unfinished.any():
                    break
        if return_log_weights:
            return MixtureSamples(sequences, log_weights)
        return sequences


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
    measure the distance to the sequence-level mixture (see :class:`GeometricMixtureLM`).

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
