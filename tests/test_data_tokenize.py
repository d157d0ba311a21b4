"""Formatting, tokenization (BOS/EOS exactly once, truncation) and collation (labels from lengths, KTO KL rows)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tokenizers import processors

from sacpo_lightning.data import (
    IGNORE_INDEX,
    KTORecord,
    PairRecord,
    TokenizeConfig,
    batch_tokenize_pairs,
    collate_kto,
    collate_pairs,
    render_prompt,
    render_response,
    tokenizer_adds_bos,
)
from sacpo_lightning.data.tokenization import batch_tokenize_kto, encode_with_bos, kl_partners, with_bos
from sacpo_lightning.models.tiny import build_tiny_tokenizer

MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How do I bake bread?"},
]
PAIR = PairRecord(MESSAGES, "Mix flour and water.", "I cannot help.", "t:1")


@pytest.fixture(scope="module")
def nobos_tokenizer():
    """The tiny tokenizer without its BOS post-processor, padding with EOS (like SmolLM2: no BOS, pad == eos)."""
    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def bos_template_tokenizer():
    """A BOS-adding tokenizer whose chat template writes the BOS itself (Llama-3 style)."""
    tok = build_tiny_tokenizer()
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    return tok


@pytest.fixture(params=["bos", "nobos"])
def any_tokenizer(request, tiny_tokenizer, nobos_tokenizer):
    return tiny_tokenizer if request.param == "bos" else nobos_tokenizer


# ----------------------------------------------------------------------------------------------------- formatting
def test_pku_template_single_and_multi_turn():
    assert render_prompt("How are you?", "pku") == "BEGINNING OF CONVERSATION: USER: How are you? ASSISTANT:"
    assert render_prompt(MESSAGES, "pku") == (
        "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT: Hello! USER: How do I bake bread? ASSISTANT:"
    )
    with_system = render_prompt("Q", "pku", system_prompt="Be safe.")
    assert with_system == "BEGINNING OF CONVERSATION: Be safe. USER: Q ASSISTANT:"
    prompt = render_prompt("Q", "pku")
    assert render_response("Sure.", "pku", prompt) == " Sure."
    assert render_response(" Sure.", "pku", prompt) == " Sure."
    assert render_response("\nSure.", "pku", prompt) == "\nSure."


def test_raw_template_keeps_strings_and_writes_messages_as_hh():
    text = "\n\nHuman: Hi\n\nAssistant:"
    assert render_prompt(text, "raw") == text
    assert render_prompt(MESSAGES, "raw") == (
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant:"
    )
    assert render_response("Sure.", "raw", text) == " Sure."
    assert render_response("Sure.", "raw", "Answer:\n") == "Sure."


def test_chat_template(tiny_tokenizer):
    expected = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert render_prompt(MESSAGES, "chat", tiny_tokenizer) == expected
    with_system = render_prompt("Q", "chat", tiny_tokenizer, system_prompt="S")
    assert with_system == "<|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n"
    assert render_response("Sure.", "chat", expected) == "Sure."
    no_template = build_tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="--data.template pku"):
        render_prompt("Q", "chat", no_template)


# --------------------------------------------------------------------------------------------------- BOS / EOS
def test_bos_detection(tiny_tokenizer, nobos_tokenizer):
    assert tokenizer_adds_bos(tiny_tokenizer) and not tokenizer_adds_bos(nobos_tokenizer)


@pytest.mark.parametrize("template", ["chat", "pku", "raw"])
def test_bos_and_eos_exactly_once(any_tokenizer, template):
    tok = any_tokenizer
    config = TokenizeConfig(max_length=256, max_prompt_length=128, template=template)
    example = batch_tokenize_pairs([PAIR, PAIR], tok, config)[1]
    assert example["index"] == 1
    adds_bos = tokenizer_adds_bos(tok)
    for key in ("chosen_ids", "rejected_ids"):
        seq = example["prompt_ids"] + example[key]
        assert seq.count(tok.bos_token_id) == (1 if adds_bos else 0)
        if adds_bos:
            assert seq[0] == tok.bos_token_id
        assert seq.count(tok.eos_token_id) == 1 and seq[-1] == tok.eos_token_id
    text = tok.decode(example["prompt_ids"] + example["chosen_ids"], skip_special_tokens=False)
    assert text == ("<s>" if adds_bos else "") + render_prompt(PAIR.prompt, template, tok) + render_response(
        PAIR.chosen, template, render_prompt(PAIR.prompt, template, tok)
    ) + "</s>"


def test_bos_written_by_the_chat_template_is_not_doubled(bos_template_tokenizer):
    config = TokenizeConfig(max_length=256, max_prompt_length=128)
    example = batch_tokenize_pairs([PAIR], bos_template_tokenizer, config)[0]
    assert example["prompt_ids"][0] == bos_template_tokenizer.bos_token_id
    assert example["prompt_ids"].count(bos_template_tokenizer.bos_token_id) == 1


def test_eos_not_doubled_when_the_response_already_ends_with_it(tiny_tokenizer):
    record = PairRecord("Q", "Yes.</s>", "No.", "t:1")
    config = TokenizeConfig(max_length=64, max_prompt_length=32, template="pku")
    example = batch_tokenize_pairs([record], tiny_tokenizer, config)[0]
    assert example["chosen_ids"].count(tiny_tokenizer.eos_token_id) == 1
    assert example["chosen_ids"][-1] == tiny_tokenizer.eos_token_id


# -------------------------------------------------------------------------------------------------- truncation
def test_prompt_truncated_from_the_left_keeping_bos(any_tokenizer):
    tok = any_tokenizer
    long = PairRecord("x" * 100 + "THE END", "ok", "no", "t:1")
    full = batch_tokenize_pairs([long], tok, TokenizeConfig(max_length=400, max_prompt_length=300, template="pku"))[0]
    cut = batch_tokenize_pairs([long], tok, TokenizeConfig(max_length=60, max_prompt_length=40, template="pku"))[0]
    assert len(cut["prompt_ids"]) == 40
    if tokenizer_adds_bos(tok):
        assert cut["prompt_ids"][0] == tok.bos_token_id and cut["prompt_ids"][1:] == full["prompt_ids"][-39:]
    else:
        assert cut["prompt_ids"] == full["prompt_ids"][-40:]
    assert tok.decode(cut["prompt_ids"]).endswith("THE END ASSISTANT:")
    assert cut["chosen_ids"] == full["chosen_ids"]  # the short response is untouched, EOS included


def test_response_truncated_to_max_length_and_loses_eos(any_tokenizer):
    tok = any_tokenizer
    record = PairRecord("Q", "y" * 200, "short", "t:1")
    stats = Counter()
    config = TokenizeConfig(max_length=80, max_prompt_length=60, template="pku")
    [example] = batch_tokenize_pairs([record], tok, config, stats=stats)
    assert len(example["prompt_ids"]) + len(example["chosen_ids"]) == 80
    assert example["chosen_ids"][-1] != tok.eos_token_id
    assert example["rejected_ids"][-1] == tok.eos_token_id
    assert stats == {"responses_truncated": 1}


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(128, 128), (128, 256)])
def test_max_prompt_length_must_be_below_max_length(max_length, max_prompt_length):
    with pytest.raises(ValueError, match=r"--data.max_prompt_length \(\d+\) must be smaller than --data.max_length"):
        TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length)


# ------------------------------------------------------------------------------------------------------ collate
def _examples():
    return [
        {"prompt_ids": [0, 10, 11], "chosen_ids": [20, 1], "rejected_ids": [30, 31, 32, 1], "index": 5},
        {"prompt_ids": [0, 12], "chosen_ids": [21, 22, 23, 24, 1], "rejected_ids": [33, 1], "index": 9},
    ]


def test_collate_pairs_layout_and_labels():
    batch = collate_pairs(_examples(), pad_token_id=2)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 7)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["index"].tolist() == [5, 9]
    pad = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [0, 10, 11, 20, 1, 2, 2],  # prompt 0 + chosen 0
        [0, 12, 21, 22, 23, 24, 1],  # prompt 1 + chosen 1
        [0, 10, 11, 30, 31, 32, 1],  # prompt 0 + rejected 0
        [0, 12, 33, 1, 2, 2, 2],  # prompt 1 + rejected 1
    ]
    assert batch["labels"].tolist() == [
        [pad, pad, pad, 20, 1, pad, pad],
        [pad, pad, 21, 22, 23, 24, 1],
        [pad, pad, pad, 30, 31, 32, 1],
        [pad, pad, 33, 1, pad, pad, pad],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [5, 7, 7, 4]


def test_collate_pad_to_multiple_of():
    batch = collate_pairs(_examples(), pad_token_id=2, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["attention_mask"][:, 7].sum() == 0 and (batch["labels"][:, 7] == IGNORE_INDEX).all()


def test_pad_equal_to_eos_keeps_the_real_eos_label(nobos_tokenizer):
    tok = nobos_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    records = [PairRecord("Q", "Yes, gladly.", "No.", "t:1"), PairRecord("Another question", "A", "B", "t:2")]
    examples = batch_tokenize_pairs(records, tok, TokenizeConfig(max_length=64, max_prompt_length=32, template="pku"))
    batch = collate_pairs(examples, pad_token_id=tok.pad_token_id)
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        assert batch["labels"][row, n - 1] == tok.eos_token_id  # the response's EOS is scored
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding (also EOS ids) is not
        assert (batch["input_ids"][row, n:] == tok.eos_token_id).all()
    assert int((batch["labels"] == tok.eos_token_id).sum()) == 4


def test_collate_kto_with_mismatched_kl_rows():
    examples = [
        {"prompt_ids": [0, 10], "completion_ids": [20, 21, 1], "kl_completion_ids": [22, 1], "desirable": True,
         "index": 0},
        {"prompt_ids": [0, 11, 12], "completion_ids": [22, 1], "kl_completion_ids": [23, 24, 25, 26, 1],
         "desirable": False, "index": 1},
        {"prompt_ids": [0, 13, 14, 15], "completion_ids": [23, 24, 25, 26, 1], "kl_completion_ids": [20, 21, 1],
         "desirable": True, "index": 2},
    ]
    batch = collate_kto(examples, pad_token_id=2, max_length=7)
    assert batch["input_ids"].shape == (3, 9)
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True, False, True]
    kl = batch["kl_input_ids"]
    n = batch["kl_attention_mask"].sum(1).tolist()
    assert kl[0, : n[0]].tolist() == [0, 10, 22, 1]  # prompt 0 + its KL completion
    assert kl[1, : n[1]].tolist() == [0, 11, 12, 23, 24, 25, 26]  # cut to max_length
    assert kl[2, : n[2]].tolist() == [0, 13, 14, 15, 20, 21, 1]
    assert batch["kl_labels"][1].tolist()[:7] == [IGNORE_INDEX] * 3 + [23, 24, 25, 26]
    # A KL row depends on its example only, not on the batch it lands in.
    alone = collate_kto(examples[2:], pad_token_id=2, max_length=7)
    assert alone["kl_input_ids"][0].tolist()[:7] == kl[2, :7].tolist()
    with pytest.raises(ValueError, match="kl_completion_ids"):
        collate_kto([{k: v for k, v in examples[0].items() if k != "kl_completion_ids"}], pad_token_id=2)


def test_kto_kl_partners_are_a_seeded_derangement(tiny_tokenizer):
    for n in (2, 3, 10):
        partners = kl_partners(n, seed=5)
        assert sorted(partners) == list(range(n)) and all(p != i for i, p in enumerate(partners))
        assert partners == kl_partners(n, seed=5)
    assert kl_partners(1) == [0]
    records = [KTORecord(f"Question {i}", f"Answer number {i}.", i % 2 == 0, f"t:{i}") for i in range(5)]
    config = TokenizeConfig(max_length=24, max_prompt_length=16, template="pku")
    examples = batch_tokenize_kto(records, tiny_tokenizer, config)
    partners = kl_partners(5)
    for e in examples:
        partner = examples[partners[e["index"]]]
        assert e["kl_completion_ids"] == partner["completion_ids"][: 24 - len(e["prompt_ids"])]
        assert len(e["prompt_ids"]) + len(e["kl_completion_ids"]) <= 24


def test_tokenize_kto_example(tiny_tokenizer):
    record = KTORecord("Q", "Answer.", False, "t:1")
    config = TokenizeConfig(max_length=64, max_prompt_length=48, template="pku")
    example = batch_tokenize_kto([record] * 4, tiny_tokenizer, config)[3]
    assert set(example) == {"prompt_ids", "completion_ids", "kl_completion_ids", "desirable", "index"}
    assert example["desirable"] is False and example["index"] == 3
    assert example["completion_ids"][-1] == tiny_tokenizer.eos_token_id
    batch = collate_kto([example], pad_token_id=tiny_tokenizer.pad_token_id, max_length=64)
    assert batch["labels"][0, len(example["prompt_ids"])] == example["completion_ids"][0]


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([], pad_token_id=0)


def test_with_bos_adds_one_bos_and_cuts_from_the_left():
    assert with_bos([5, 6, 7], 1) == [1, 5, 6, 7]
    assert with_bos([1, 5, 6, 7], 1) == [1, 5, 6, 7]  # written by a chat template: not doubled
    assert with_bos([1, 5, 6, 7], 1, max_tokens=3) == [1, 6, 7]  # the end is kept, and the BOS
    assert with_bos([5, 6, 7], None, max_tokens=2) == [6, 7]
    assert with_bos([], 1) == [1]


def test_encode_with_bos_matches_the_training_prompt_ids(tiny_tokenizer):
    """Generation, guard judges and the merge KL encode prompts exactly like the training data."""
    config = TokenizeConfig(max_length=64, max_prompt_length=8, template="pku")
    record = PairRecord("a rather long prompt that is cut", "x", "y", "t:1")
    example = batch_tokenize_pairs([record], tiny_tokenizer, config)[0]
    rendered = render_prompt(record.prompt, "pku", tiny_tokenizer, None)
    assert encode_with_bos(tiny_tokenizer, [rendered], max_tokens=8)[0] == example["prompt_ids"]
    bos = tiny_tokenizer.bos_token_id
    assert [row[0] for row in encode_with_bos(tiny_tokenizer, ["hi", tiny_tokenizer.bos_token + "hi"])] == [bos, bos]
