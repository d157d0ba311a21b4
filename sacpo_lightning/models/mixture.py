"""The token-level geometric mixture of two causal LMs, decoded with one KV cache per model.

:class:`GeometricMixtureLM` runs ``m(y_t | ctx) ~ pi_A(y_t | ctx) ** (1 - q) * pi_B(y_t | ctx) ** q``, renormalised
at every position (the log-prob math is :func:`geometric_mixture_logprobs`). With A the step-1
and B the step-2 SACPO policy it approximates the sequence-level mixture, the optimum for safety weight ``q * lambda``;
:meth:`GeometricMixtureLM.generate` can return the importance log-weights ``log W = sum_t log Z_t`` that correct its
samples into estimates under the sequence-level mixture.

Why the mixture: SACPO's two steps solve KL-regularised problems whose optimal policies are
``pi* ~ pi_ref * exp(objective / beta)``, so the log-linear (geometric) mixture of the step-1 and step-2 models over
whole responses,

    pi*_q(y | x)  ~  pi_r(y | x) ** (1 - q)  *  pi_{r + lambda g}(y | x) ** q
                  ~  pi_ref(y | x) * exp((r(x, y) + q * lambda * g(x, y)) / beta),

is exactly the optimal policy for weight ``q * lambda``. Decoding it directly is intractable; the token-level mixture
(:func:`geometric_mixture_logprobs`) approximates it, the two differing by the per-token normalisers
``Z_t = sum_v pi_r(v | ctx) ** (1 - q) * pi_{r + lambda g}(v | ctx) ** q`` (:func:`geometric_mixture_log_normalizer`),
with ``pi*_q(y) / m(y) ~ prod_t Z_t(y)``: the importance weight that corrects samples of ``m`` into (self-normalised)
estimates under ``pi*_q`` (:mod:`sacpo_lightning.importance`). The tensor math here does not depend on Lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from sacpo_lightning.errors import UserError
from sacpo_lightning.io import PathLike
from sacpo_lightning.merge_weight import check_q
from sacpo_lightning.models.compat import MergeError, check_compatible
from sacpo_lightning.models.policy import load_model_folder

__all__ = [
    "GeometricMixtureLM",
    "MixtureSamples",
    "check_unmodified_sampling",
    "geometric_mixture",
    "geometric_mixture_log_normalizer",
    "geometric_mixture_logprobs",
    "token_kl",
]


# ----------------------------------------------------------------------------------------------------------------------
# Token-level mixture math
# ----------------------------------------------------------------------------------------------------------------------


def geometric_mixture(logits_a: Tensor, logits_b: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """``(log_probs, log_z)``: the token-level mixture's log-probs ``(..., V)`` and log-normalisers ``(...)``.

    ``log_z = logsumexp((1 - q) * log_softmax(a) + q * log_softmax(b))``; it is exactly 0 at ``q`` in ``{0, 1}`` (one
    normalised distribution) and ``<= 0`` otherwise (Hoelder's inequality).
    """
    q = check_q(q)
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
    return geometric_mixture(logits_a, logits_b, q)[0]


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
    return geometric_mixture(logits_a, logits_b, q)[1]


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
# Decoding
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


def _check_decoding(do_sample: bool, temperature: float, top_p: float, return_log_weights: bool) -> None:
    """Refuses bad sampling settings, and settings under which ``log W`` would not be the importance weight."""
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if return_log_weights:
        check_unmodified_sampling(do_sample, temperature, top_p)


def _long_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The attention mask as long on ``input_ids``' device; all ones when omitted."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return attention_mask.to(device=input_ids.device, dtype=torch.long)


def _step_logits(
    models: list[torch.nn.Module], cache_args: list[str], caches: list[Any], step_ids: Tensor, attention_mask: Tensor
) -> list[Tensor]:
    """Runs each model on this step's ids with its KV cache (updated in ``caches``); last-position logits of each."""
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
    return logits


def _next_tokens(
    logprobs: Tensor,
    unfinished: Tensor,
    pad_token_id: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Tensor:
    """The next token of each row: sampled (tempered, nucleus-filtered) or the arg-max; ``pad_token_id`` once ended."""
    if do_sample:
        scores = logprobs / temperature
        if top_p < 1:
            scores = _top_p_filter(scores, top_p)
        next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    else:
        next_tokens = logprobs.argmax(dim=-1)
    return torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))


def _accumulate_log_weights(log_weights: Tensor, log_z: Tensor, unfinished: Tensor) -> None:
    """Adds this step's ``log Z_t`` to ``log_weights`` in place, for the rows that had not ended yet."""
    # This step's token is part of the response (the EOS included) only for rows that had not ended yet.
    log_weights += torch.where(unfinished, log_z.to(torch.float64), 0.0)


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
        raise UserError(
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
        self._q = check_q(value)

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
        model_a = load_model_folder(str(dir_a), dtype)
        model_b = load_model_folder(str(dir_b), model_a.dtype if dtype is None else dtype)
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
        return geometric_mixture(logits[0], logits[1], self.q)

    def _special_ids(
        self, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, device: torch.device
    ) -> tuple[Tensor | None, int]:
        """``(EOS ids or None, pad id)``: EOS defaults to model A's config, padding to the first EOS id (or 0)."""
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        eos = _eos_tensor(eos_token_id, device)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos is not None else 0
        return eos, pad_token_id

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
        _check_decoding(do_sample, temperature, top_p, return_log_weights)
        device = input_ids.device
        attention_mask = _long_mask(input_ids, attention_mask)
        eos, pad_token_id = self._special_ids(eos_token_id, pad_token_id, device)

        models = self._active()
        cache_args = [_cache_argument(model) for model in models]
        caches: list[Any] = [None] * len(models)
        sequences = input_ids
        step_ids = input_ids
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        # float64: a long response sums hundreds of per-token terms.
        log_weights = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=device)
        for _ in range(max_new_tokens):
            logprobs, log_z = self._combine(_step_logits(models, cache_args, caches, step_ids, attention_mask))
            next_tokens = _next_tokens(logprobs, unfinished, pad_token_id, do_sample, temperature, top_p, generator)
            _accumulate_log_weights(log_weights, log_z, unfinished)
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
