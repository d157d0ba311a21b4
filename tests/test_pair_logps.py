"""``pair_sequence_logps``: a pair batch scored with each prompt once equals the two-row pass."""

from __future__ import annotations

import pytest
import torch

from sacpo_lightning.data.collate import collate_pairs
from sacpo_lightning.logprobs import _packable, _shared_prompt_lengths, model_sequence_logps, pair_sequence_logps
from sacpo_lightning.models.tiny import build_tiny_llama

# (prompt, chosen, rejected) lengths: responses longer and shorter than each other, a one-token pair, and a prompt of
# one token, so packed rows are padded differently from the two-row batch.
SHAPES = [(5, 7, 3), (9, 2, 11), (1, 1, 1), (12, 6, 6)]


def pair_batch(shapes=SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 500, (n,), generator=gen).tolist()

    examples = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "index": i}
                for i, (p, c, r) in enumerate(shapes)]
    return collate_pairs(examples, pad_token_id=0)


def tiny(attn: str) -> torch.nn.Module:
    model = build_tiny_llama(0).double()
    model.config._attn_implementation = attn
    return model


def args(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("average", [False, True])
def test_equals_two_row_pass_values_and_gradients(attn: str, average: bool) -> None:
    model, batch = tiny(attn), pair_batch()
    assert _shared_prompt_lengths(*args(batch)).tolist() == [p for p, _, _ in SHAPES]
    two_rows = model_sequence_logps(model, *args(batch), average=average)
    packed = pair_sequence_logps(model, *args(batch), average=average)
    # float64 model; the tiny Llama's RMSNorm computes in float32, hence 1e-6 and not 1e-12
    torch.testing.assert_close(packed, two_rows, rtol=0, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    g_two = torch.autograd.grad(two_rows.sum(), params)
    g_packed = torch.autograd.grad(pair_sequence_logps(model, *args(batch), average=average).sum(), params)
    for a, b in zip(g_two, g_packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_mask_matters_a_plain_causal_pass_differs() -> None:
    """The near miss: packing prompt + chosen + rejected under a plain causal mask (the rejected tokens see the chosen
    ones) changes the rejected log-probs far beyond the tolerance above, so the equality test can fail."""
    model, batch = tiny("sdpa"), pair_batch()
    half = batch["input_ids"].shape[0] // 2
    exact = model_sequence_logps(model, *args(batch))
    prompt = _shared_prompt_lengths(*args(batch))
    rows, labels = [], []
    width = 0
    for i in range(half):
        p, c_end = int(prompt[i]), int(batch["attention_mask"][i].sum())
        r_end = int(batch["attention_mask"][half + i].sum())
        row = torch.cat([batch["input_ids"][i, :c_end], batch["input_ids"][half + i, p:r_end]])
        lab = torch.full_like(row, -100)
        lab[c_end:] = batch["input_ids"][half + i, p:r_end]
        rows.append(row), labels.append(lab)
        width = max(width, row.numel())
    ids = torch.zeros(half, width, dtype=torch.long)
    lab = torch.full((half, width), -100)
    mask = torch.zeros(half, width, dtype=torch.long)
    for i, (row, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : row.numel()], lab[i, : row.numel()], mask[i, : row.numel()] = row, lb, 1
    leaky = model_sequence_logps(model, ids, mask, lab)  # scores the rejected tokens only, with the chosen in view
    # (the first rejected token is predicted from the last chosen token here: the second way the near miss is wrong)
    assert (leaky - exact[half:]).abs().max() > 1e-2


def test_rows_without_a_shared_prompt_use_the_two_row_pass() -> None:
    model, batch = tiny("sdpa"), pair_batch()
    half = batch["input_ids"].shape[0] // 2
    batch["input_ids"][half, 0] += 1  # rejected row 0 has another first prompt token
    assert _shared_prompt_lengths(*args(batch)) is None
    assert torch.equal(pair_sequence_logps(model, *args(batch)), model_sequence_logps(model, *args(batch)))


def test_left_padding_or_an_odd_row_count_is_not_packed() -> None:
    batch = pair_batch()
    left = {k: v.flip(-1) for k, v in batch.items() if k != "index"}
    assert _shared_prompt_lengths(*args(left)) is None
    odd = {k: v[:-1] for k, v in batch.items() if k != "index"}
    assert _shared_prompt_lengths(*args(odd)) is None


def test_attention_without_custom_masks_uses_the_two_row_pass(monkeypatch) -> None:
    model, batch = tiny("sdpa"), pair_batch()
    calls = []
    real = model.forward

    def forward(*a, **kw):
        calls.append(kw.get("position_ids"))
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", forward)
    pair_sequence_logps(model, *args(batch))
    assert calls[-1] is not None  # packed: explicit position ids
    model.config.sliding_window = 4096
    pair_sequence_logps(model, *args(batch))
    assert calls[-1] is None
    assert _packable(model) is None
    model.config.sliding_window = None
    assert _packable(model) == "bool"
    for attn, kind in (("eager", "float"), ("flash_attention_2", None), ("flex_attention", None)):
        model.config._attn_implementation = attn
        assert _packable(model) == kind


def test_eager_under_bf16_autocast_is_packed_and_does_not_depend_on_the_batch() -> None:
    """A pair's packed log-probs are the same bit for bit alone and in a padded batch (eager attention, bf16
    autocast), so a reference cache computed in other batches than training agrees with the live reference."""
    model = build_tiny_llama(0)
    model.config._attn_implementation = "eager"
    batch = pair_batch()
    half = batch["input_ids"].shape[0] // 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _packable(model) == "float"
        together = pair_sequence_logps(model, *args(batch))
        for i in range(half):
            rows = [i, half + i]
            width = int(batch["attention_mask"][rows].sum(-1).max())
            alone = pair_sequence_logps(model, *(t[rows, :width] for t in args(batch)))
            assert torch.equal(alone, together[rows])


def test_sdpa_in_low_precision_uses_the_two_row_pass() -> None:
    model = build_tiny_llama(0)
    model.config._attn_implementation = "sdpa"
    assert _packable(model) == "bool"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _packable(model) is None
    assert _packable(model.to(torch.bfloat16)) is None
