"""TRL's dataset shapes: standard and conversational, explicit and implicit prompt, unpaired; CSV; ``hub:`` arguments.

The fixture rows follow the examples of TRL's dataset-format guide. Each shape is detected, converted, tokenized and
trains one step of the tiny model; conversational rows train on the final assistant turn only.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from sacpo_lightning.data import DataError, KTORecord, PairRecord, PreferenceDataModule, SourceSpec, load_records
from sacpo_lightning.data.collate import IGNORE_INDEX
from sacpo_lightning.data.sources import parse_hub_ref, read_rows, resolve_data_path
from sacpo_lightning.models.policy import LoraSettings, PolicySettings
from sacpo_lightning.modules import OptimSettings, RewardDPO, RewardKTO


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


COLOURS = [("sky", "blue", "green"), ("grass", "green", "red"), ("sun", "yellow", "purple"), ("snow", "white", "black")]

SHAPES: dict[str, list[dict]] = {
    "standard_preference": [
        {"prompt": f"The {t} is", "chosen": f" {good}.", "rejected": f" {bad}."} for t, good, bad in COLOURS
    ],
    "standard_implicit_prompt_preference": [
        {"chosen": f"The {t} is {good}.", "rejected": f"The {t} is {bad}."} for t, good, bad in COLOURS
    ],
    "conversational_preference": [
        {"prompt": [user(f"What color is the {t}?")], "chosen": [assistant(f"It is {good}.")],
         "rejected": [assistant(f"It is {bad}.")]}
        for t, good, bad in COLOURS
    ],
    "conversational_implicit_prompt_preference": [
        {"chosen": [user(f"What color is the {t}?"), assistant(f"It is {good}.")],
         "rejected": [user(f"What color is the {t}?"), assistant(f"It is {bad}.")]}
        for t, good, bad in COLOURS
    ],
    "standard_unpaired_preference": [
        {"prompt": f"The {t} is", "completion": f" {c}.", "label": ok}
        for t, good, bad in COLOURS for c, ok in ((good, True), (bad, False))
    ],
    "conversational_unpaired_preference": [
        {"prompt": [user(f"What color is the {t}?")], "completion": [assistant(f"It is {c}.")], "label": ok}
        for t, good, bad in COLOURS for c, ok in ((good, True), (bad, False))
    ],
}
DETECTED = {
    "standard_preference": "generic (preference pairs, standard, explicit prompt)",
    "standard_implicit_prompt_preference": "generic (preference pairs, standard, implicit prompt)",
    "conversational_preference": "generic (preference pairs, conversational, explicit prompt)",
    "conversational_implicit_prompt_preference": "generic (preference pairs, conversational, implicit prompt)",
    "standard_unpaired_preference": "kto (unpaired prompt/completion/label, standard)",
    "conversational_unpaired_preference": "kto (unpaired prompt/completion/label, conversational)",
}


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def kind_of(shape: str) -> str:
    return "kto" if "unpaired" in shape else "pairs"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_is_detected_and_converted(tmp_path, shape):
    path = write_jsonl(tmp_path / f"{shape}.jsonl", SHAPES[shape])
    result = load_records([path], SourceSpec(source="auto", kind=kind_of(shape)))
    assert result.shapes == {path: DETECTED[shape]}
    first = result.records[0]
    if shape.startswith("standard_unpaired"):
        assert first == KTORecord("The sky is", " blue.", True, f"{path}:1")
        assert result.records[1].desirable is False
    elif shape.startswith("conversational_unpaired"):
        assert first == KTORecord([user("What color is the sky?")], "It is blue.", True, f"{path}:1")
    elif shape.startswith("standard"):
        # TRL's extract_prompt: the common prefix, less the space that ends it, is the prompt.
        assert first == PairRecord("The sky is", " blue.", " green.", f"{path}:1")
    else:
        assert first == PairRecord([user("What color is the sky?")], "It is blue.", "It is green.", f"{path}:1")


def test_detection_is_logged_and_sources_detect_pku_and_hh(tmp_path, caplog):
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.",
                                              "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}])
    pku = write_jsonl(tmp_path / "pku.jsonl", [{
        "prompt": "Q", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
        "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 0}])
    with caplog.at_level("INFO"):
        result = load_records([hh, pku], SourceSpec(source="auto"))
    assert result.shapes == {hh: "hh (HH-RLHF transcripts, implicit prompt)", pku: "pku (PKU-SafeRLHF pairs)"}
    assert result.records[0] == PairRecord([user("Hi?")], "Hello.", "Go away.", f"{hh}:1")
    assert result.records[1] == PairRecord("Q", "a", "b", f"{pku}:1")  # safety pairs: the safe response chosen
    assert f"Data shape of {hh}: HH-RLHF transcripts, implicit prompt (--data.source hh" in caplog.text


def test_multi_turn_conversations_train_only_the_final_assistant_turn(tmp_path, tiny_tokenizer):
    history = [user("Hi."), assistant("EARLIER REPLY"), user("What color is the sky?")]
    rows = [
        {"chosen": [*history, assistant("It is blue.")], "rejected": [*history, assistant("It is green.")]},
        {"prompt": history[:1], "chosen": [history[1], history[2], assistant("Blue.")],
         "rejected": [history[1], history[2], assistant("Green.")]},
    ]
    path = write_jsonl(tmp_path / "multi.jsonl", rows)
    dm = PreferenceDataModule([path], kind="pairs", val_fraction=0.0, batch_size=2, duplicates="keep")
    dm.set_tokenizer(tiny_tokenizer)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=2, collate_fn=loader.collate_fn)))
    prompt_text = tiny_tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert "EARLIER REPLY" in prompt_text  # the earlier assistant turn is in the input ...
    prompt_ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]]
    replies = ["It is blue.", "Blue.", "It is green.", "Green."]  # rows: chosen of both pairs, then rejected
    for row, reply in enumerate(replies):
        reply_ids = [*tiny_tokenizer(reply, add_special_tokens=False)["input_ids"], tiny_tokenizer.eos_token_id]
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        start, end = len(prompt_ids), len(prompt_ids) + len(reply_ids)
        assert ids[:end].tolist() == prompt_ids + reply_ids
        # ... but only the final assistant turn (and its EOS) carries labels.
        assert labels[start:end].tolist() == reply_ids
        assert (labels[:start] == IGNORE_INDEX).all() and (labels[end:] == IGNORE_INDEX).all()
    assert "conversational, implicit prompt" in dm.shapes[path]


def _step_module(kind: str, tiny_model_dir: str):
    policy = PolicySettings(name_or_path=tiny_model_dir, finetune="lora", lora=LoraSettings(r=4, alpha=8))
    optim = OptimSettings(lr=1e-2, warmup_ratio=0.0)
    module = RewardKTO(policy=policy, optim=optim, auto_class_weights=False) if kind == "kto" else RewardDPO(
        policy=policy, optim=optim)
    module.configure_model()
    return module


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_trains_a_step_on_the_tiny_model(tmp_path, shape, tiny_model_dir, one_thread):
    kind = kind_of(shape)
    path = write_jsonl(tmp_path / f"{shape}.jsonl", SHAPES[shape])
    dm = PreferenceDataModule([path], kind=kind, tokenizer=tiny_model_dir, val_fraction=0.0, batch_size=4,
                              template="raw" if shape.startswith("standard") else "chat")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()  # every row has response tokens
    module = _step_module(kind, tiny_model_dir)
    trainable = [p for p in module.policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loss, _ = module.compute_loss(batch)
    # at initialisation the policy equals its reference: DPO's loss is ln 2, KTO's 1 - sigmoid(0)
    assert loss.item() == pytest.approx(math.log(2) if kind == "pairs" else 0.5, abs=1e-5)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))
    loss_after, _ = module.compute_loss(batch)
    assert torch.isfinite(loss_after) and loss_after.item() < loss.item()


# ------------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": [user("Q")], "chosen": [user("A")], "rejected": [assistant("B")]},
         "field 'chosen' must end with an assistant turn, but its last message has role 'user'"),
        ({"chosen": [user("Q"), assistant("x"), user("Q2"), assistant("A")],
          "rejected": [user("Q"), assistant("y"), user("Q2"), assistant("B")]},
         "differ before their final assistant turn (message 1)"),
        ({"chosen": [assistant("A")], "rejected": [assistant("B")]},
         "field 'prompt' is missing and fields 'chosen/rejected' share no messages before their replies"),
        ({"chosen": "Blue.", "rejected": "Green."},
         "field 'prompt' is missing and fields 'chosen/rejected' share no prefix"),
        ({"prompt": "Q", "chosen": [assistant("A")], "rejected": "B"}, "mix a conversation and a text"),
        ({"prompt": [user("Q")], "chosen": [{"role": "assistant", "text": "A"}], "rejected": [assistant("B")]},
         "must be text or a list of {role, content} messages; item 0"),
    ],
)
def test_bad_rows_name_file_line_and_fix(tmp_path, row, expected):
    good = SHAPES["conversational_preference"][0] if isinstance(row.get("chosen"), list) else {
        "prompt": "Q", "chosen": "A", "rejected": "B"}
    if "prompt" not in row:
        good = SHAPES["conversational_implicit_prompt_preference"][0] if isinstance(row["chosen"], list) else \
            SHAPES["standard_implicit_prompt_preference"][0]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        load_records([path], SourceSpec(source="auto"))
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and expected in message and "--data.on_invalid skip" in message


def test_a_missing_prompt_in_an_explicit_prompt_file_is_not_taken_as_implicit(tmp_path):
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"promt": "The sky is", "chosen": "It is blue.", "rejected": "It is green."}]  # shared prefix "It is"
    path = write_jsonl(tmp_path / "typo.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt' is missing"):
        load_records([path], SourceSpec(source="generic"))


def test_unknown_shape_and_kind_mismatch_are_explained(tmp_path):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(DataError) as err:
        load_records([odd], SourceSpec(source="auto"))
    assert f"{odd}:1: cannot tell the data's shape from its fields ('question', 'answer')" in str(err.value)
    assert "--data.column_mapping" in str(err.value) and "--data.source" in str(err.value)
    kto = write_jsonl(tmp_path / "kto.jsonl", SHAPES["standard_unpaired_preference"])
    with pytest.raises(DataError, match="holds unpaired prompt/completion/label.*set --data.kind kto"):
        load_records([kto], SourceSpec(source="auto"))
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "Q", "good": "A", "bad": "B"}])
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    mapped = load_records([renamed], SourceSpec(source="auto", column_mapping=mapping))
    assert mapped.records == [PairRecord("Q", "A", "B", f"{renamed}:1")]
    assert mapped.shapes == {renamed: "generic (preference pairs, standard, explicit prompt)"}


# ------------------------------------------------------------------------------------------------------ CSV
def write_csv(path, header: list[str], rows: list[list[str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_csv_reads_like_json_lines_with_line_numbers(tmp_path):
    conv = json.dumps([assistant("It is blue.")])
    path = write_csv(tmp_path / "kto.csv", ["prompt", "completion", "label"], [
        ["The sky is", " blue.", "true"],
        ["A prompt\nover two lines", " x.", "0"],
        [json.dumps([user("What color is the sky?")]), conv, "TRUE"],
    ])
    text = open(path).read().replace("\\n", "\n")  # a quoted cell over two physical lines
    open(path, "w").write(text)
    assert [o for o, _ in read_rows(path)] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    records = load_records([path], SourceSpec(source="auto", kind="kto")).records
    assert records == [
        KTORecord("The sky is", " blue.", True, f"{path}:2"),
        KTORecord("A prompt\nover two lines", " x.", False, f"{path}:3"),
        KTORecord([user("What color is the sky?")], "It is blue.", True, f"{path}:5"),
    ]
    bad = write_csv(tmp_path / "bad.csv", ["prompt", "completion", "label"], [
        ["The sky is", " blue.", "true"], ["The sky is", " green.", "maybe"], ["Only two", "cells"]])
    with pytest.raises(DataError) as err:
        load_records([bad], SourceSpec(source="kto", kind="kto"))
    assert str(err.value).startswith(f"{bad}:3: field 'label' must be true or false, got 'maybe'")
    assert "wrong_columns 1" in str(err.value)
    result = load_records([bad], SourceSpec(source="kto", kind="kto", on_invalid="skip"))
    assert len(result.records) == 1 and result.skipped == {"wrong_type": 1, "wrong_columns": 1}
    dup = tmp_path / "dup.csv"
    dup.write_text("prompt,prompt\nQ,A\n")
    with pytest.raises(DataError, match=rf"{dup}:1: the CSV header .* repeated column name"):
        list(read_rows(str(dup)))


# ------------------------------------------------------------------------------------------------------ hub
def test_hub_references_name_config_split_and_revision():
    assert parse_hub_ref("hub:trl-lib/ultrafeedback_binarized") == parse_hub_ref("trl-lib/ultrafeedback_binarized")
    ref = parse_hub_ref("hub:trl-internal-testing/zen?config=standard_preference&split=test&revision=abc123")
    assert (ref.dataset_id, ref.config, ref.data_dir, ref.split, ref.revision) == (
        "trl-internal-testing/zen", "standard_preference", None, "test", "abc123")
    old = parse_hub_ref("hub:Anthropic/hh-rlhf/harmless-base:test")
    assert (old.dataset_id, old.config, old.data_dir, old.split, old.revision) == (
        "Anthropic/hh-rlhf", None, "harmless-base", "test", None)
    for bad, expected in (
        ("hub:owner/name?splt=test", "'splt=test' after '?'"),
        ("hub:owner/name:test?split=train", "gives split twice"),
        ("hub:not a dataset", "does not name a Hub dataset"),
    ):
        with pytest.raises(ValueError, match=expected) as err:
            resolve_data_path(bad, "--data.val_files")
        assert str(err.value).startswith("--data.val_files: ")


def test_hub_source_passes_its_arguments_to_load_dataset(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(SHAPES["conversational_implicit_prompt_preference"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ref = "hub:trl-internal-testing/zen?config=conversational_implicit_prompt_preference&revision=v1"
    result = load_records([resolve_data_path(ref)], SourceSpec(source="auto"))
    assert calls == [("trl-internal-testing/zen", {
        "name": "conversational_implicit_prompt_preference", "data_dir": None, "split": "train", "revision": "v1"})]
    assert result.records[0] == PairRecord([user("What color is the sky?")], "It is blue.", "It is green.",
                                           f"{ref}[0]")
    assert result.shapes[ref] == DETECTED["conversational_implicit_prompt_preference"]
