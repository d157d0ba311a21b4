"""``sacpo merge`` on two tiny random Llamas (seeds 0 and 1): merged folders, report, KL, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sacpo_lightning.cli import main as sacpo_main
from sacpo_lightning.io import atomic_directory, is_complete_directory
from sacpo_lightning.merge_kl import kl_texts
from sacpo_lightning.merge_report import REPORT_FILE, read_kl_prompts
from sacpo_lightning.merging import linear_merge_state_dicts
from sacpo_lightning.merging_cli import main
from sacpo_lightning.models import load_tokenizer
from sacpo_lightning.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_cli")
    return save_tiny_model(root / "a", seed=0), save_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    rows = [{"prompt": "How do I pick a lock?", "category": "x"}, {"prompt": "Hi"}, {"prompt": "Never used"}]
    path.write_text(json.dumps(rows))
    return path


def _state(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_merge_writes_folders_and_report_with_kl(folders, prompt_file, tmp_path, capsys):
    dir_a, dir_b = folders
    out = tmp_path / "merges"
    argv = ["merge", "--base", str(dir_a), "--other", str(dir_b), "--weights", "0", "0.5", "1", "--output", str(out),
            "--kl-prompts", str(prompt_file), "--kl-max-prompts", "2"]
    assert sacpo_main(argv) == 0  # through the top-level dispatcher

    names = ["merge_q0.00", "merge_q0.50", "merge_q1.00"]
    assert all(is_complete_directory(out / name) for name in names)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["num_prompts"] == 2 and report["base"] == str(dir_a.resolve())
    entries = report["merges"]
    assert [e["q"] for e in entries] == [0.0, 0.5, 1.0]
    assert [e["path"] for e in entries] == [str(out / name) for name in names]
    assert entries[0]["kl_mixture_vs_merge"] == pytest.approx(0.0, abs=1e-6)
    assert entries[2]["kl_mixture_vs_merge"] == pytest.approx(0.0, abs=1e-6)
    assert entries[1]["kl_mixture_vs_merge"] > 1e-4
    assert len({e["num_tokens"] for e in entries}) == 1 and entries[0]["num_tokens"] > 10

    expected = linear_merge_state_dicts(_state(dir_a), _state(dir_b), 0.5)
    merged = _state(out / "merge_q0.50")
    assert all(torch.equal(merged[k], v) for k, v in expected.items())

    table = capsys.readouterr().out
    assert "KL(mix||merge)" in table and "merge_q0.50" in table


def test_merge_without_prompts_has_no_kl(folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--base", str(folders[0]), "--other", str(folders[1]), "--weights", "0.25", "--output", str(out),
                 "--dtype", "bfloat16"]) == 0
    entry = json.loads((out / REPORT_FILE).read_text())["merges"][0]
    assert entry["kl_mixture_vs_merge"] is None and entry["num_tokens"] is None
    assert AutoModelForCausalLM.from_pretrained(out / "merge_q0.25").dtype == torch.bfloat16


def test_mismatched_models_exit_2_with_message(folders, tmp_path, capsys):
    narrow = tmp_path / "narrow"
    with atomic_directory(narrow) as tmp:
        build_tiny_llama(1, hidden_size=32).save_pretrained(tmp)
        build_tiny_tokenizer().save_pretrained(tmp)
    argv = ["--base", str(folders[0]), "--other", str(narrow), "--weights", "0.5", "--output", str(tmp_path / "o")]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "sacpo merge: error:" in captured.err and "'hidden_size' is 64 in A and 32 in B" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--other", "{missing}"], "--other folder {missing} does not exist"),
        (["--kl-prompts", "{missing}"], "Prompt file {missing} does not exist"),
        (["--weights", "0.5", "0.501"], "not distinct"),
    ],
)
def test_bad_arguments_exit_2(args, message, folders, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    argv = ["--base", str(folders[0]), "--other", str(folders[1]), "--weights", "0.5", "--output", str(tmp_path / "o")]
    assert main(argv + [arg.format(missing=missing) for arg in args]) == 2  # a repeated option overrides the first
    err = capsys.readouterr().err
    assert message.format(missing=missing) in err and "Traceback" not in err


def test_weight_outside_unit_interval_is_a_usage_error(folders, tmp_path, capsys):
    argv = ["--base", str(folders[0]), "--other", str(folders[1]), "--weights", "1.5", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "weights must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_config_file_dashed_aliases_and_print_config(folders, tmp_path, capsys):
    out = tmp_path / "from_config"
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {folders[0]}\nother: {folders[1]}\nweights: [0.25, 0.75]\noutput: {out}\n")
    assert main(["--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "weights:" in printed and "kl_max_prompts: 16" in printed and "kl_max_length: 512" in printed
    assert not out.exists()

    assert main(["--config", str(config), "--weights", "[0.5]", "--kl-batch-size", "2"]) == 0  # the command line wins
    report = json.loads((out / REPORT_FILE).read_text())
    assert [e["q"] for e in report["merges"]] == [0.5] and report["kl_prompts"] is None


def test_read_kl_prompts_uses_the_prompt_set_reader(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"prompt": "b", "category": "x"}\n{"prompt": "c"}\n')
    assert read_kl_prompts(jsonl) == ["a", "b", "c"]
    assert read_kl_prompts(jsonl, max_prompts=2) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="Prompt file .* does not exist"):
        read_kl_prompts(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="max_prompts must be >= 1"):
        read_kl_prompts(jsonl, max_prompts=0)
    jsonl.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(ValueError, match=rf"{jsonl}:2: 'prompt' must be a non-empty string"):
        read_kl_prompts(jsonl)


def test_shared_safety_prompts_load_and_render(shared_data, folders):
    prompts = read_kl_prompts(f"{shared_data}/eval/safety_problem.json", max_prompts=3)
    assert len(prompts) == 3 and all(prompts)
    rendered = kl_texts(prompts[:1], load_tokenizer(str(folders[0])))
    assert rendered == [f"<|user|>\n{prompts[0]}<|end|>\n<|assistant|>\n"]
