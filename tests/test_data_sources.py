"""Sources: readers, PKU/HH/generic/KTO conversion, bad-input messages, duplicates, prompt-level split."""

from __future__ import annotations

import json
import os

import pytest

from sacpo_lightning.data import (
    DataError,
    KTORecord,
    PairRecord,
    SourceSpec,
    hh_transcript,
    load_records,
    parse_hh_transcript,
    prompt_key,
    resolve_data_path,
    split_by_prompt,
    split_hh_pair,
    subsample,
)


def pku_row(**overrides):
    row = {
        "prompt": "How do I pick a lock?",
        "response_0": "I cannot help with that.",
        "response_1": "Insert a tension wrench and rake the pins.",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "better_response_id": 1,
        "safer_response_id": 0,
    }
    row.update(overrides)
    return row


def write_lines(path, lines) -> str:
    """Writes JSON lines; items that are bytes or str are written verbatim."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return str(path)


def pku_fixtures(shared_data) -> str:
    return os.path.join(shared_data, "pku_saferlhf", "safety_pairs.fixtures.jsonl")


def pku_train(shared_data) -> str:
    return os.path.join(shared_data, "pku_saferlhf", "safety_pairs.train.jsonl")


def hh_helpful(shared_data) -> str:
    return os.path.join(shared_data, "hh_rlhf", "helpful.train.jsonl")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------------------ PKU
def test_pku_safe_pairs_follow_safer_response_id(shared_data):
    path = pku_fixtures(shared_data)
    rows = read_jsonl(path)
    result = load_records([path], SourceSpec(source="pku", objective="safe"))
    assert len(result.records) == len(rows) == 36 and result.rows == 36 and not result.skipped
    for n, (row, rec) in enumerate(zip(rows, result.records, strict=True), start=1):
        assert isinstance(rec, PairRecord)
        assert rec.prompt == row["prompt"]
        safer = row["safer_response_id"]
        assert rec.chosen == row[f"response_{safer}"] and rec.rejected == row[f"response_{1 - safer}"]
        assert row[f"is_response_{safer}_safe"] is True  # the chosen one is the safe one in this file
        assert rec.source == f"{path}:{n}"


def test_pku_helpful_pairs_follow_better_response_id(tmp_path):
    rows = [pku_row(better_response_id=1), pku_row(prompt="Q2", better_response_id=0)]
    path = write_lines(tmp_path / "both.jsonl", rows)
    records = load_records([path], SourceSpec(objective="helpful")).records
    assert records[0].chosen == pku_row()["response_1"] and records[0].rejected == pku_row()["response_0"]
    assert records[1].chosen == pku_row()["response_0"]


def test_pku_kto_from_flags(shared_data):
    path = pku_fixtures(shared_data)
    rows = read_jsonl(path)
    records = load_records([path], SourceSpec(kind="kto", kto_from="flags", duplicates="keep")).records
    assert len(records) == 2 * len(rows)
    for i, row in enumerate(rows):
        for j in (0, 1):
            rec = records[2 * i + j]
            assert isinstance(rec, KTORecord)
            assert rec.completion == row[f"response_{j}"] and rec.desirable is row[f"is_response_{j}_safe"]


def test_kto_from_pairs(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [pku_row()])
    records = load_records([path], SourceSpec(kind="kto", kto_from="pairs")).records
    assert [(r.completion, r.desirable) for r in records] == [
        (pku_row()["response_0"], True),
        (pku_row()["response_1"], False),
    ]


@pytest.mark.parametrize("kto_from", [None, "flags"])
def test_pku_helpful_kto_never_reads_the_safety_flags(tmp_path, kto_from):
    # Rows where the better (more helpful) response is the unsafe one, so flags and helpfulness disagree.
    rows = [pku_row(), pku_row(prompt="Q2", better_response_id=0, safer_response_id=1,
                               is_response_0_safe=False, is_response_1_safe=True)]
    path = write_lines(tmp_path / "h.jsonl", rows)
    asked = {} if kto_from is None else {"kto_from": kto_from}  # None: the default, flags
    with pytest.raises(ValueError) as err:
        SourceSpec(objective="helpful", kind="kto", **asked)
    msg = str(err.value)
    assert "--data.kto_from flags" in msg and "--data.objective is helpful" in msg
    assert "--data.kto_from pairs" in msg and "--data.objective safe" in msg
    # What the message proposes builds desirable/undesirable from better_response_id.
    records = load_records([path], SourceSpec(objective="helpful", kind="kto", kto_from="pairs")).records
    assert [(r.prompt, r.completion, r.desirable) for r in records] == [
        (rows[0]["prompt"], rows[0]["response_1"], True),
        (rows[0]["prompt"], rows[0]["response_0"], False),
        ("Q2", rows[1]["response_0"], True),
        ("Q2", rows[1]["response_1"], False),
    ]


def test_helpful_kto_from_real_train_file_fails_as_the_pair_path_does(shared_data):
    path = pku_train(shared_data)
    with pytest.raises(DataError) as pairs_err:
        load_records([path], SourceSpec(objective="helpful"))
    with pytest.raises(DataError) as kto_err:
        load_records([path], SourceSpec(objective="helpful", kind="kto", kto_from="pairs"))
    assert str(kto_err.value) == str(pairs_err.value)
    assert "better_response_id" in str(kto_err.value) and "is null in all 2950 rows" in str(kto_err.value)
    # Asked as kto_from flags (the default) it is refused before reading, instead of training on safety labels.
    with pytest.raises(ValueError, match="--data.kto_from pairs"):
        load_records([path], SourceSpec(objective="helpful", kind="kto"))


def test_filter_safety_differs_counts_dropped_rows(tmp_path):
    both_safe = pku_row(prompt="Both safe?", is_response_0_safe=True, is_response_1_safe=True)
    path = write_lines(tmp_path / "f.jsonl", [pku_row(), both_safe])
    result = load_records([path], SourceSpec(filter="safety_differs"))
    assert len(result.records) == 1 and result.skipped == {"filtered_safety_differs": 1}


def test_helpful_pairs_from_real_train_file_fail_with_a_clear_message(shared_data):
    path = pku_train(shared_data)
    with pytest.raises(DataError) as err:
        load_records([path], SourceSpec(objective="helpful"))
    msg = str(err.value)
    assert "better_response_id" in msg and "is null in all 2950 rows" in msg and path in msg
    assert "--data.objective safe" in msg


def test_helpful_pairs_from_real_train_file_with_skip_still_refuses_an_empty_dataset(shared_data):
    path = pku_train(shared_data)
    with pytest.warns(UserWarning, match="null_label: 2950"), pytest.raises(DataError) as err:
        load_records([path], SourceSpec(objective="helpful", on_invalid="skip"))
    msg = str(err.value)
    assert "No usable examples" in msg and path in msg and "objective=helpful" in msg and "on_invalid=skip" in msg
    assert "is null in all 2950 rows" in msg


def test_skip_drops_bad_rows_and_counts_them(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [pku_row(), pku_row(prompt="Q2", safer_response_id=None), "{oops"])
    with pytest.warns(UserWarning, match="Skipped 2 invalid rows"):
        result = load_records([path], SourceSpec(on_invalid="skip"))
    assert len(result.records) == 1
    assert result.skipped == {"null_label": 1, "invalid_json": 1}


# -------------------------------------------------------------------------------------------------- bad rows
BAD_ROWS = {
    "missing_field": ({k: v for k, v in pku_row().items() if k != "response_1"}, "'response_1'", "is missing"),
    "wrong_type": (pku_row(safer_response_id="zero"), "'safer_response_id'", "must be 0 or 1, got 'zero'"),
    "invalid_label": (pku_row(safer_response_id=2), "'safer_response_id'", "must be 0 or 1, got 2"),
    "null_label": (pku_row(safer_response_id=None), "'safer_response_id'", "is null"),
    "empty_text": (pku_row(response_0="  \n "), "'response_0'", "empty or whitespace"),
    "text_wrong_type": (pku_row(prompt=5), "'prompt'", "must be text, got 5 (int)"),
    "identical_responses": (pku_row(response_1=pku_row()["response_0"]), "'response_1'", "are identical"),
    "invalid_json": ('{"prompt": "x",', None, "not valid JSON"),
    "invalid_utf8": (b'{"prompt": "caf\xe9"}', None, "not valid UTF-8 (byte 0xe9"),
    "not_an_object": ("[1, 2]", None, "JSON list, expected an object"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_each_bad_row_kind_names_file_line_and_field(tmp_path, kind):
    bad, field, words = BAD_ROWS[kind]
    path = write_lines(tmp_path / "bad.jsonl", [pku_row(prompt="fine"), bad, pku_row(prompt="also fine")])
    with pytest.raises(DataError) as err:
        load_records([path], SourceSpec())
    msg = str(err.value)
    assert f"{path}:2: " in msg and words in msg and "--data.on_invalid skip" in msg
    if field is not None:
        assert field in msg
    # skipped in skip mode and counted under a reason of its own
    with pytest.warns(UserWarning):
        result = load_records([path], SourceSpec(on_invalid="skip"))
    assert len(result.records) == 2 and sum(result.skipped.values()) == 1
    assert next(iter(result.skipped)) == kind.replace("text_wrong_type", "wrong_type")


def test_many_bad_rows_report_the_first_and_the_counts(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [pku_row(), "{", pku_row(safer_response_id=None), "{"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*3 invalid rows in this file: invalid_json 2, null_label 1"):
        load_records([path], SourceSpec())


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_records([str(path)], SourceSpec(on_invalid="skip"))


def test_empty_json_list_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="is empty"):
        load_records([str(path)], SourceSpec())


def test_binary_file_is_an_error(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary file"):
        load_records([str(path)], SourceSpec())


def test_duplicates_dropped_counted_kept_or_refused(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [pku_row(), pku_row(prompt="Q2"), pku_row()])
    result = load_records([path], SourceSpec())
    assert len(result.records) == 2 and result.skipped == {"duplicate": 1}
    assert len(load_records([path], SourceSpec(duplicates="keep")).records) == 3
    with pytest.raises(DataError, match=r"d\.jsonl:3: duplicate of the example at .*d\.jsonl:1"):
        load_records([path], SourceSpec(duplicates="error"))


def test_json_list_and_parquet_readers(tmp_path):
    rows = [pku_row(), pku_row(prompt="Q2", safer_response_id=1)]
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    for path in (str(json_path), str(pq_path)):
        records = load_records([path], SourceSpec()).records
        assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]"]
        assert records[1].chosen == rows[1]["response_1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([pku_row(), pku_row(prompt="")]))
    with pytest.raises(DataError, match=r"bad\.json\[1\]: field 'prompt' is empty"):
        load_records([str(bad)], SourceSpec())


# ------------------------------------------------------------------------------------------------------------- HH
def test_hh_multi_turn_prompt_parsed_into_messages(shared_data):
    path = hh_helpful(shared_data)
    rows = read_jsonl(path)
    records = load_records([path], SourceSpec(source="hh")).records
    assert len(records) == len(rows) == 5236
    first = records[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "How can I find out what types of butterflies are in my area?"
    assert first.prompt[-1]["content"] == "Great. What are some common species then?"
    assert first.chosen.startswith("About 150 species") and first.chosen == rows[0]["chosen"][1:]
    # lossless: the raw template writes the original transcript back for every row
    for row, rec in zip(rows, records, strict=True):
        assert hh_transcript(rec.prompt) == row["prompt"]
        assert rec.prompt[-1]["role"] == "user"


def test_hh_full_transcript_rows_split_at_last_shared_assistant_marker(tmp_path, shared_data):
    rows = read_jsonl(hh_helpful(shared_data))[:5]
    full = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    path = write_lines(tmp_path / "hh_full.jsonl", full)
    split = load_records([path], SourceSpec(source="hh")).records
    paired = load_records([write_lines(tmp_path / "hh.jsonl", rows)], SourceSpec(source="hh")).records
    assert [(r.prompt, r.chosen, r.rejected) for r in split] == [(r.prompt, r.chosen, r.rejected) for r in paired]
    assert split_hh_pair("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b") == (
        "\n\nHuman: hi\n\nAssistant:",
        " a",
        " b",
    )


def test_hh_transcript_errors():
    with pytest.raises(ValueError, match="does not start with"):
        parse_hh_transcript("Hello\n\nAssistant:")
    with pytest.raises(ValueError, match="does not end with"):
        parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello")
    with pytest.raises(ValueError, match="no human turn"):
        parse_hh_transcript("\n\nHuman: hi\n\nAssistant: a\n\nAssistant:")


def test_hh_bad_transcript_row_names_line_and_field(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [{"prompt": "no markers", "chosen": " a", "rejected": " b"}])
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'prompt' is not an HH transcript"):
        load_records([path], SourceSpec(source="hh"))


# ------------------------------------------------------------------------------------------------ generic / KTO
def test_generic_with_column_mapping_and_chat_messages(tmp_path):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "?"},
    ]
    path = write_lines(
        tmp_path / "g.jsonl",
        [{"question": "What is 2+2?", "good": "4", "bad": "5"}, {"question": messages, "good": "Yes", "bad": "No"}],
    )
    spec = SourceSpec(source="generic", column_mapping={"prompt": "question", "chosen": "good", "rejected": "bad"})
    records = load_records([path], spec).records
    assert records[0] == PairRecord("What is 2+2?", "4", "5", f"{path}:1")
    assert records[1].prompt == messages
    with pytest.raises(DataError, match=r"field 'chosen' is missing .* in all 2 rows .*g\.jsonl:1\). .*column_mapping"):
        load_records([path], SourceSpec(source="generic", column_mapping={"prompt": "question"}))
    rows = [{"question": "q", "good": "a", "bad": "b"}, {"question": "q2", "bad": "b"}]
    path = write_lines(tmp_path / "g2.jsonl", rows)
    with pytest.raises(DataError, match=r"g2\.jsonl:2: field 'good' is missing"):
        load_records([path], spec)


def test_generic_messages_must_end_with_a_user_turn(tmp_path):
    bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_lines(tmp_path / "g.jsonl", [{"prompt": bad, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="must end with a user turn"):
        load_records([path], SourceSpec(source="generic"))


def test_kto_source(tmp_path):
    path = write_lines(
        tmp_path / "k.jsonl",
        [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False}],
    )
    records = load_records([path], SourceSpec(source="kto", kind="kto")).records
    assert [(r.completion, r.desirable) for r in records] == [("good", True), ("bad", False)]
    path = write_lines(tmp_path / "k2.jsonl", [{"prompt": "p", "completion": "c", "label": None}])
    with pytest.raises(DataError, match=r"k2\.jsonl:1: field 'label' is null"):
        load_records([path], SourceSpec(source="kto", kind="kto"))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"source": "kto", "kind": "pairs"}, "--data.kind kto"),
        ({"source": "hh", "kind": "kto", "kto_from": "flags"}, "--data.kto_from pairs"),
        ({"source": "hh", "filter": "safety_differs"}, "--data.filter safety_differs"),
        ({"column_mapping": {"question": "prompt"}}, "--data.column_mapping key 'question'"),
        ({"objective": "harmless"}, "--data.objective must be one of"),
    ],
)
def test_source_spec_rejects_bad_option_combinations(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SourceSpec(**kwargs)


# ------------------------------------------------------------------------------------------------ split / paths
def test_split_by_prompt_has_no_overlap_and_is_deterministic(shared_data):
    records = load_records([pku_train(shared_data)], SourceSpec()).records
    train, val = split_by_prompt(records, 0.1, seed=3)
    train_prompts = {prompt_key(r.prompt) for r in train}
    val_prompts = {prompt_key(r.prompt) for r in val}
    assert not train_prompts & val_prompts
    assert len(train) + len(val) == len(records)
    assert 0.05 < len(val_prompts) / (len(train_prompts) + len(val_prompts)) < 0.15
    again_train, again_val = split_by_prompt(list(reversed(records)), 0.1, seed=3)
    assert {prompt_key(r.prompt) for r in again_val} == val_prompts  # independent of row order
    other_val = {prompt_key(r.prompt) for r in split_by_prompt(records, 0.1, seed=4)[1]}
    assert other_val != val_prompts


def test_split_keeps_both_sides_non_empty_for_tiny_data():
    records = [PairRecord(f"p{i}", "a", "b", f"x:{i}") for i in range(3)]
    train, val = split_by_prompt(records, 0.01, seed=0)
    assert train and len(val) == 1
    train, val = split_by_prompt(records, 0.99, seed=0)
    assert len(train) == 1 and val
    assert split_by_prompt(records, 0.0, seed=0) == (records, [])


def test_subsample_is_seeded_and_keeps_order():
    records = list(range(100))
    a = subsample(records, 10, seed=1)
    assert a == subsample(records, 10, seed=1) and a == sorted(a) and len(a) == 10
    assert a != subsample(records, 10, seed=2)
    assert subsample(records, None, seed=1) == records


def test_resolve_data_path(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "x.jsonl", [pku_row()])
    monkeypatch.setenv("SACPO_TEST_DIR", str(tmp_path))
    assert resolve_data_path("$SACPO_TEST_DIR/x.jsonl") == path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_path("~/x.jsonl") == path
    with pytest.raises(FileNotFoundError, match=r"--data.val_files: data file .*missing\.jsonl does not exist"):
        resolve_data_path(str(tmp_path / "missing.jsonl"), "--data.val_files")
    assert resolve_data_path("PKU-Alignment/PKU-SafeRLHF") == "hub:PKU-Alignment/PKU-SafeRLHF"
    assert resolve_data_path("hub:Anthropic/hh-rlhf/harmless-base:test") == "hub:Anthropic/hh-rlhf/harmless-base:test"
    with pytest.raises(FileNotFoundError):
        resolve_data_path("data/train.jsonl")


def test_nothing_left_after_the_filter_is_an_error_naming_files_and_options(tmp_path):
    both_safe = [pku_row(prompt=f"Q{i}", is_response_0_safe=True, is_response_1_safe=True) for i in range(2)]
    path = write_lines(tmp_path / "all_safe.jsonl", both_safe)
    words = r"No usable examples .*all_safe\.jsonl.*filter=safety_differs.*filtered_safety_differs 2"
    with pytest.raises(DataError, match=words):
        load_records([path], SourceSpec(filter="safety_differs"))
