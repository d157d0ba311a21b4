"""Sequence log-probabilities from causal-LM logits, without a full-vocabulary float32 ``log_softmax``.

A causal LM's logits at position ``t`` predict the token at ``t + 1``, so ``logits[:, :-1]`` is scored against
``labels[:, 1:]``. Labels equal to ``ignore_index`` (prompt and padding tokens) contribute nothing.

The per-token log-prob is computed as ``logit[label] - logsumexp(logits)`` on bounded chunks of positions, each upcast
to float32 on its own, so the extra memory is ``O(chunk_size * V)`` rather than ``O(B * S * V)`` float32 values. A
custom autograd function recomputes the softmax chunk by chunk in the backward pass instead of keeping the upcast
chunks alive; its only saved state beyond the caller's logits is a ``(B, S - 1)`` float32 log-normaliser.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["model_sequence_logps", "pair_sequence_logps", "sequence_logprobs", "token_logprobs"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 logits keep float64 (exact gradient checks); half precision and float32 are computed in float32.
    return torch.promote_types(dtype, torch.float32)


def _chunks(batch: int, length: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """Yields ``(rows, positions)`` slices tiling a ``(batch, length)`` grid, at most ``chunk_size`` cells each."""
    if length == 0:
        return
    if length <= chunk_size:
        rows_per_chunk = max(1, chunk_size // length)
        for start in range(0, batch, rows_per_chunk):
            yield slice(start, min(start + rows_per_chunk, batch)), slice(0, length)
    else:
        for row in range(batch):
            for start in range(0, length, chunk_size):
                yield slice(row, row + 1), slice(start, min(start + chunk_size, length))


class _ShiftedTokenLogprobs(torch.autograd.Function):
    """``out[b, t] = log_softmax(logits[b, t])[targets[b, t]]`` for ``t < S - 1``, zero where ``mask`` is False."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mask: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        batch, seq_len, _ = logits.shape
        length = seq_len - 1
        dtype = _compute_dtype(logits.dtype)
        out = torch.zeros(batch, length, dtype=dtype, device=logits.device)
        lse = torch.zeros(batch, length, dtype=dtype, device=logits.device)
        for rows, pos in _chunks(batch, length, chunk_size):
            chunk = logits[rows, pos].to(dtype)
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, targets[rows, pos].unsqueeze(-1)).squeeze(-1)
            out[rows, pos] = picked - chunk_lse
            lse[rows, pos] = chunk_lse
        out = out.masked_fill(~mask, 0.0)
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        logits, targets, mask, lse = ctx.saved_tensors
        batch, seq_len, _ = logits.shape
        length = seq_len - 1
        dtype = lse.dtype
        grad_tokens = grad_out.to(dtype).masked_fill(~mask, 0.0)
        # The last position predicts nothing and keeps a zero gradient.
        grad_logits = torch.zeros_like(logits)
        for rows, pos in _chunks(batch, length, ctx.chunk_size):
            g = grad_tokens[rows, pos].unsqueeze(-1)
            probs = torch.exp(logits[rows, pos].to(dtype) - lse[rows, pos].unsqueeze(-1))
            chunk_grad = probs.mul_(-g)
            chunk_grad.scatter_add_(-1, targets[rows, pos].unsqueeze(-1), g)
            grad_logits[rows, pos] = chunk_grad.to(grad_logits.dtype)
        return grad_logits, None, None, None


def _validate(logits: Tensor, labels: Tensor, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, S, V), got {tuple(logits.shape)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, S), got {tuple(labels.shape)}")
    if tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits (B, S, V)={tuple(logits.shape)} and labels (B, S)={tuple(labels.shape)} disagree on (B, S)"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the shifted labels.

    Args:
        logits: (B, S, V) causal-LM logits, any floating dtype.
        labels: (B, S) integer token ids; ``ignore_index`` marks tokens that are not scored.
        ignore_index: Label value to skip.
        chunk_size: Maximum number of positions upcast at once; bounds the extra memory to about
            ``chunk_size * V`` float32 values.

    Returns:
        ``(logps, mask)``: (B, S - 1) log-probs (float32, or float64 for float64 logits; 0 where masked) and the
        (B, S - 1) bool mask of scored positions.

    Raises:
        ValueError: On shape or dtype mismatch, or a scored label outside ``[0, V)``.
    """
    _validate(logits, labels, chunk_size)
    batch, seq_len, vocab = logits.shape
    dtype = _compute_dtype(logits.dtype)
    if seq_len < 2:
        empty = torch.zeros(batch, 0, dtype=dtype, device=logits.device)
        return empty, torch.zeros(batch, 0, dtype=torch.bool, device=logits.device)
    shifted = labels[:, 1:]
    mask = shifted != ignore_index
    # An out-of-range id would otherwise surface as an opaque device-side assert inside gather on CUDA.
    if bool(((shifted < 0) | (shifted >= vocab)).logical_and(mask).any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    targets = shifted.masked_fill(~mask, 0).long()
    logps = _ShiftedTokenLogprobs.apply(logits, targets, mask, chunk_size)
    return logps, mask


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    average: bool = False,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> Tensor:
    """Summed (or per-token averaged) log-probability of each sequence's labelled tokens.

    ``logits[:, t]`` scores ``labels[:, t + 1]``; positions whose label is ``ignore_index`` are skipped. Never
    materialises a full float32 ``log_softmax`` over the vocabulary (see the module docstring), and is
    differentiable with respect to ``logits``.

    Args:
        logits: (B, S, V) causal-LM logits, any floating dtype (bf16/fp16 are upcast chunk by chunk).
        labels: (B, S) integer token ids, ``ignore_index`` on prompt and padding tokens.
        average: If True, divide by the number of scored tokens (IPO-style length normalisation).
        ignore_index: Label value to skip.
        chunk_size: Maximum number of positions upcast at once.

    Returns:
        (B,) log-probs in float32 (float64 for float64 logits). A row with no scored token gives 0.

    Raises:
        ValueError: On shape or dtype mismatch, or a scored label outside ``[0, V)``.
    """
    logps, mask = token_logprobs(logits, labels, ignore_index=ignore_index, chunk_size=chunk_size)
    total = logps.sum(dim=-1)
    if average:
        total = total / mask.sum(dim=-1).clamp(min=1).to(total.dtype)
    return total


def _base_forward(model: torch.nn.Module):
    """The unwrapped ``forward`` of the model's class (of the base model under a PEFT wrapper)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.unwrap(type(base).forward)


def model_sequence_logps(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, average: bool = False
) -> Tensor:
    """(B,) summed (or per-token averaged) log-probs of the labelled tokens of each row under a causal LM.

    Only the positions that predict a labelled token go through the LM head (``logits_to_keep`` as a boolean
    mask, which Hugging Face models built on ``slice_logits_to_keep`` accept): prompt and padding positions skip
    the vocabulary projection and the log-softmax. Other models with ``logits_to_keep`` keep the last positions
    from the batch's first labelled one; the rest compute all logits. The result is the same in each case.

    Args:
        model: A causal LM (or a PEFT model around one) whose forward returns ``.logits``.
        input_ids: (B, S) token ids.
        attention_mask: (B, S) attention mask.
        labels: (B, S) token ids, -100 on prompt and padding tokens.
        average: If True, divide by the number of scored tokens (as :func:`sequence_logprobs`).

    Returns:
        (B,) log-probs, differentiable with respect to the model's parameters.
    """
    import inspect

    forward = _base_forward(model)
    scored = labels[:, 1:] != -100  # position t predicts the labelled token t + 1
    n_scored = int(scored.sum())
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if n_scored and "slice_logits_to_keep" in forward.__globals__:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = scored
        # One unused position last, so that the flattened logits (T + 1, V) score targets shifted by one, the
        # layout token_logprobs expects.
        keep[-1, -1] = True
        logits = model(**inputs, logits_to_keep=keep).logits
        targets = torch.full((1, n_scored + 1), -100, dtype=labels.dtype, device=labels.device)
        targets[0, 1:] = labels[:, 1:][scored]
        logps, _ = token_logprobs(logits.unsqueeze(0), targets)
        rows = scored.nonzero()[:, 0]
        total = torch.zeros(labels.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps[0])
        if average:
            total = total / scored.sum(dim=-1).clamp(min=1).to(total.dtype)
        return total
    labelled = scored.any(dim=0).nonzero()
    keep_last = labels.shape[1] - int(labelled[0]) if labelled.numel() else 0
    if 0 < keep_last < labels.shape[1] and "logits_to_keep" in inspect.signature(forward).parameters:
        logits = model(**inputs, logits_to_keep=keep_last).logits
        labels = labels[:, -keep_last:]
    else:
        logits = model(**inputs).logits
    return sequence_logprobs(logits, labels, average=average)


# Attention implementations that read a custom 4D mask as it is given: eager adds a float mask to the scores, SDPA
# takes a boolean one. SDPA's CPU kernels round differently with the padded width of the batch in bf16 (about 5e-4 on
# an attention output), so a pair would not get the same log-probs in a reference-cache batch as in a training batch;
# under autocast or half-precision weights SDPA therefore keeps the two-row pass (which is width-invariant), and eager
# attention is packed at any precision. Others (flash attention, flex) always use two rows.
_PACKABLE_ATTENTION = {"eager": "float", "sdpa": "bool"}


def _low_precision(model: torch.nn.Module) -> bool:
    """Whether the model computes in bf16/fp16: half-precision weights, or autocast on for its device."""
    param = next(model.parameters(), None)
    if param is None:
        return False
    if param.dtype in (torch.bfloat16, torch.float16):
        return True
    device_type = param.device.type
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (
        torch.bfloat16, torch.float16)


def _shared_prompt_lengths(input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor | None:
    """(B,) prompt lengths when rows ``i`` and ``B + i`` of a (2B, S) batch share their prompt, else None.

    Each row must be one right-padded sequence whose labelled tokens are exactly the ones after its prompt (the layout
    of :func:`~sacpo_lightning.data.collate.pad_and_label`).
    """
    rows, width = labels.shape
    if rows < 2 or rows % 2 or attention_mask.shape != labels.shape or input_ids.shape != labels.shape:
        return None
    scored = labels != -100
    if not bool(scored.any(dim=-1).all()):
        return None
    lengths = attention_mask.sum(dim=-1)
    prompt = scored.int().argmax(dim=-1)
    positions = torch.arange(width, device=labels.device)
    valid = positions < lengths[:, None]
    if not (torch.equal(attention_mask.bool(), valid)
            and torch.equal(scored, valid & (positions >= prompt[:, None]))):
        return None
    half = rows // 2
    if not torch.equal(prompt[:half], prompt[half:]):
        return None
    same = (input_ids[:half] == input_ids[half:]) | (positions >= prompt[:half, None])
    return prompt[:half] if bool(same.all()) else None


def _packable(model: torch.nn.Module) -> str | None:
    """The mask kind (``float`` or ``bool``) the model's attention reads, or None when packing is not supported."""
    import inspect

    forward = _base_forward(model)
    config = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
    if config is None or "slice_logits_to_keep" not in forward.__globals__:
        return None
    if "position_ids" not in inspect.signature(forward).parameters:
        return None
    if getattr(config, "sliding_window", None) or getattr(config, "layer_types", None) and any(
            t != "full_attention" for t in config.layer_types):
        return None
    kind = _PACKABLE_ATTENTION.get(getattr(config, "_attn_implementation", None))
    if kind == "bool" and _low_precision(model):
        return None
    return kind


def pair_sequence_logps(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, average: bool = False
) -> Tensor:
    """(2B,) log-probs of a pair batch (rows ``0..B-1`` prompt + chosen, ``B..2B-1`` prompt + rejected) in one pass
    over B rows that hold each prompt once.

    Row ``i`` of the pass is ``prompt_i + chosen_i + rejected_i``: position ids restart after the prompt for the
    rejected response, and a 4D attention mask lets its tokens see the prompt and themselves but not the chosen
    response, so every token sees exactly the context it has in its own row. The last prompt position predicts the
    first token of both responses. The result equals :func:`model_sequence_logps` on the 2B rows up to float
    rounding (``tests/test_pair_logps.py``), with the prompt tokens computed once instead of twice.

    Falls back to :func:`model_sequence_logps` when rows ``i`` and ``B + i`` do not share their prompt, the labels
    are not the responses of right-padded rows, or the model does not take a custom mask (attention other than eager
    or SDPA, SDPA in bf16/fp16 (see ``_PACKABLE_ATTENTION``), sliding-window layers, no boolean ``logits_to_keep``).
    """
    kind = _packable(model)
    prompt = _shared_prompt_lengths(input_ids, attention_mask, labels) if kind else None
    if prompt is None:
        return model_sequence_logps(model, input_ids, attention_mask, labels, average=average)
    half = input_ids.shape[0] // 2
    device = input_ids.device
    lengths = attention_mask.sum(dim=-1)
    chosen_len, rejected_len = lengths[:half] - prompt, lengths[half:] - prompt
    total = prompt + chosen_len + rejected_len
    width = int(total.max())
    pos = torch.arange(width, device=device)
    # Segments of each packed row: 0 prompt, 1 chosen, 2 rejected, 3 padding.
    start_rejected = (prompt + chosen_len)[:, None]
    segment = torch.where(pos < prompt[:, None], 0, torch.where(pos < start_rejected, 1,
                                                                torch.where(pos < total[:, None], 2, 3)))
    # Gather the packed ids from the two input rows.
    src_chosen = pos.clamp(max=input_ids.shape[1] - 1).expand(half, width)
    src_rejected = (pos - chosen_len[:, None]).clamp(0, input_ids.shape[1] - 1)
    ids = torch.where(segment == 2, input_ids[half:].gather(1, src_rejected), input_ids[:half].gather(1, src_chosen))
    ids = torch.where(segment == 3, input_ids[:half, :1].expand(half, width), ids)
    position_ids = torch.where(segment == 2, pos - chosen_len[:, None], pos)
    position_ids = torch.where(segment == 3, 0, position_ids)
    # Query q sees key k when k <= q, k is not padding, and not (q rejected, k chosen).
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    allowed = (pos[None, :, None] >= pos[None, None, :]) & (k_seg != 3) & ~((q_seg == 2) & (k_seg == 1))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)  # padding queries see themselves
    if kind == "float":
        dtype = next(model.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    # Targets: the token after each position within its own response; the last prompt position predicts the first
    # chosen token here and the first rejected token below.
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    targets = torch.full_like(ids, -100)
    predicts = (segment == 0) & (pos[None] == prompt[:, None] - 1)
    predicts |= (segment == 1) & (pos[None] < start_rejected - 1)
    predicts |= (segment == 2) & (pos[None] < total[:, None] - 1)
    targets = torch.where(predicts, next_ids, targets)
    keep = predicts.clone()
    keep[-1, -1] = True  # one unused position last (see model_sequence_logps); never a predicting position
    logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep).logits
    logits = logits.reshape(-1, logits.shape[-1])
    # token_logprobs scores row t against target t + 1: targets shifted by one, the unused last row scores nothing.
    flat = torch.cat([targets.new_full((1,), -100), targets[keep][:-1]])[None]
    logps = token_logprobs(logits.unsqueeze(0), flat)[0][0]
    owner = torch.where(segment == 2, torch.arange(half, device=device)[:, None] + half,
                        torch.arange(half, device=device)[:, None].expand(half, width))[keep][:-1]
    out = torch.zeros(2 * half, dtype=logps.dtype, device=device).index_add(0, owner, logps)
    # First rejected tokens, from the last prompt position's logits.
    order = keep.flatten().cumsum(0) - 1
    first_rows = order[torch.arange(half, device=device) * width + prompt - 1]
    first_logits = logits[first_rows].to(torch.promote_types(logits.dtype, torch.float32))
    first_targets = input_ids[half:].gather(1, prompt[:, None])
    first = first_logits.log_softmax(-1).gather(1, first_targets).squeeze(1)
    out = out + torch.cat([torch.zeros_like(first), first])
    if average:
        out = out / torch.cat([chosen_len, rejected_len]).clamp(min=1).to(out.dtype)
    return out
