"""Tests for ``sacpo_lightning.logprobs``: chunked sequence log-probs against the naive full ``log_softmax``."""

from __future__ import annotations

import math

import pytest
import torch

from sacpo_lightning.logprobs import sequence_logprobs, token_logprobs

IGNORE = -100


def naive_sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Reference implementation: full float32 ``log_softmax`` over the vocabulary, then gather."""
    logits = logits[:, :-1].float() if logits.dtype != torch.float64 else logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    total = (picked * mask).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def make_batch(
    batch: int = 3, seq_len: int = 7, vocab: int = 11, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels with a masked prompt prefix and right padding that differ per row."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(batch, seq_len, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    for row in range(batch):
        labels[row, : 1 + row] = IGNORE  # prompt
        if row % 2 == 1:
            labels[row, seq_len - row :] = IGNORE  # padding
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 6, 1024])
def test_matches_naive_float32(average: bool, chunk_size: int) -> None:
    """Every chunking (single positions, partial rows, several rows, everything at once) equals the naive result."""
    logits, labels = make_batch()
    got = sequence_logprobs(logits, labels, average=average, chunk_size=chunk_size)
    want = naive_sequence_logprobs(logits, labels, average=average)
    assert got.dtype == torch.float32
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_matches_naive_bf16(average: bool) -> None:
    """bf16 logits are upcast per chunk: the result is float32 and equals the naive float32 computation on the same
    (bf16-rounded) logits, so no bf16 rounding enters after the logits."""
    logits, labels = make_batch(batch=4, seq_len=9, vocab=37, dtype=torch.bfloat16)
    got = sequence_logprobs(logits, labels, average=average, chunk_size=3)
    want = naive_sequence_logprobs(logits, labels, average=average)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_hand_computed_value() -> None:
    """Uniform logits over V=4 give log(1/4) per scored token.

    Labels (IGNORE, IGNORE, 1, 2, IGNORE): shifted labels (IGNORE, 1, 2, IGNORE) score 2 tokens, so the sum is
    2 * log(1/4) = -2.7726 and the average is log(1/4) = -1.3863.
    """
    logits = torch.zeros(1, 5, 4)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, IGNORE]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(2 * math.log(0.25), abs=1e-6)
    assert sequence_logprobs(logits, labels, average=True).item() == pytest.approx(math.log(0.25), abs=1e-6)


def test_shift_alignment() -> None:
    """logits[:, t] scores labels[:, t + 1]: a one-hot spike of +100 at (t=0, id 3) makes label 3 at t=1 certain
    (log-prob ~ 0) while the same label at t=0 is never scored."""
    logits = torch.zeros(1, 2, 5)
    logits[0, 0, 3] = 100.0
    assert sequence_logprobs(logits, torch.tensor([[IGNORE, 3]])).item() == pytest.approx(0.0, abs=1e-6)
    # Label 3 at t=0 is unscored and the t=1 label 0 is scored by logits[:, 0], where it has log-prob -100.
    assert sequence_logprobs(logits, torch.tensor([[3, 0]])).item() == pytest.approx(-100.0, abs=1e-4)


def test_masking_changes_only_masked_positions() -> None:
    """Changing the logits at a position whose next label is ignored leaves the result unchanged."""
    logits, labels = make_batch()
    base = sequence_logprobs(logits, labels)
    perturbed = logits.clone()
    # Row r ignores labels[r, : 1 + r], so logits[r, t] for t < r score nothing.
    perturbed[1:, 0] += 50.0 * torch.randn_like(perturbed[1:, 0])
    perturbed[2, 1] -= 30.0
    perturbed[:, -1] += 7.0  # the last position predicts nothing
    torch.testing.assert_close(sequence_logprobs(perturbed, labels), base)


def test_all_masked_row_gives_zero() -> None:
    """A row with every label ignored sums (and averages) to exactly 0 and gets zero gradient."""
    logits, labels = make_batch()
    labels[1] = IGNORE
    logits.requires_grad_(True)
    for average in (False, True):
        out = sequence_logprobs(logits, labels, average=average)
        assert out[1].item() == 0.0
        assert out[0].item() != 0.0
    out.sum().backward()
    assert torch.count_nonzero(logits.grad[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("average", [False, True])
def test_gradients_match_naive(dtype: torch.dtype, average: bool) -> None:
    """The chunked backward pass equals autograd through the naive log_softmax, in the logits' own dtype."""
    logits, labels = make_batch(batch=3, seq_len=8, vocab=13, dtype=dtype)
    weights = torch.tensor([0.5, -1.0, 2.0])

    mine = logits.clone().requires_grad_(True)
    (sequence_logprobs(mine, labels, average=average, chunk_size=4) * weights).sum().backward()
    naive = logits.clone().requires_grad_(True)
    (naive_sequence_logprobs(naive, labels, average=average) * weights).sum().backward()

    assert mine.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(mine.grad, naive.grad, **tol)
    assert torch.count_nonzero(mine.grad[:, -1]) == 0


def test_gradcheck_float64() -> None:
    """Finite differences agree with the custom backward pass (float64 logits are computed in float64)."""
    logits, labels = make_batch(batch=2, seq_len=5, vocab=6, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sequence_logprobs(x, labels, average=True, chunk_size=3), (logits,), eps=1e-6, atol=1e-7
    )


def test_no_full_vocab_float32_buffer() -> None:
    """Forward and backward with bf16 logits never allocate a float32 tensor as large as the logits.

    With chunk_size=4 and V=257 the largest float32 intermediate has 4 * 257 elements, versus B*S*V = 2*33*257 for
    a full upcast; a TorchDispatchMode records every float32 output size.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.largest = max(self.largest, t.numel())
            return out

    logits, labels = make_batch(batch=2, seq_len=33, vocab=257, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    with LargestFloat32() as mode:
        sequence_logprobs(logits, labels, chunk_size=4).sum().backward()
    assert 0 < mode.largest <= 4 * 257
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_token_logprobs_shape_and_mask() -> None:
    """Per-token output is (B, S - 1), zero where masked, and sums to sequence_logprobs."""
    logits, labels = make_batch()
    logps, mask = token_logprobs(logits, labels)
    assert logps.shape == mask.shape == (3, 6)
    assert torch.equal(mask, labels[:, 1:] != IGNORE)
    assert torch.all(logps[~mask] == 0)
    torch.testing.assert_close(logps.sum(-1), sequence_logprobs(logits, labels))


def test_custom_ignore_index() -> None:
    """ignore_index is honoured instead of -100."""
    logits, labels = make_batch()
    relabelled = labels.masked_fill(labels == IGNORE, 999)
    torch.testing.assert_close(
        sequence_logprobs(logits, relabelled, ignore_index=999), sequence_logprobs(logits, labels)
    )


def test_single_position_sequence() -> None:
    """S = 1 has nothing to score: zeros of shape (B,)."""
    out = sequence_logprobs(torch.randn(2, 1, 5), torch.tensor([[1], [2]]))
    assert out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), {}, r"logits must have shape \(B, S, V\)"),
        (torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), {}, r"labels must have shape \(B, S\)"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), {}, "disagree on"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), {}, "labels must be an integer tensor"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), {}, "floating-point"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), {"chunk_size": 0}, "chunk_size must be > 0"),
        (torch.zeros(1, 3, 4), torch.tensor([[0, 4, 0]]), {}, r"labels must lie in \[0, 4\)"),
        (torch.zeros(1, 3, 4), torch.tensor([[0, -5, 0]]), {}, r"labels must lie in \[0, 4\)"),
    ],
)
def test_bad_arguments(logits: torch.Tensor, labels: torch.Tensor, kwargs: dict, match: str) -> None:
    """Malformed inputs give a clear ValueError instead of a broadcasting or indexing error."""
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(logits, labels, **kwargs)


def test_out_of_range_label_at_ignored_position_is_fine() -> None:
    """Only scored labels are range-checked: the unscored first label may be anything."""
    out = sequence_logprobs(torch.zeros(1, 3, 4), torch.tensor([[17, 1, 2]]))
    assert out.item() == pytest.approx(2 * math.log(0.25), abs=1e-6)
