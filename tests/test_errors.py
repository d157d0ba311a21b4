"""User errors end ``sacpo`` with their message alone and status 2; ``--debug`` shows the traceback; bugs keep it."""

from __future__ import annotations

import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from local_http import serve

from sacpo_lightning.cli import main
from sacpo_lightning.errors import (
    DEBUG_ENV,
    MissingDependencyError,
    MissingFileError,
    UserError,
    debug_enabled,
    find_user_error,
    require_extra,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_debug_env():
    """``main(["--debug", ...])`` sets SACPO_DEBUG for the stages it starts; later tests must not inherit it."""
    before = os.environ.get(DEBUG_ENV)
    yield
    if before is None:
        os.environ.pop(DEBUG_ENV, None)
    else:
        os.environ[DEBUG_ENV] = before


@pytest.fixture
def bad_json_file(tmp_path, pku_fixtures) -> Path:
    """The PKU fixtures with line 6 replaced by text that is not JSON."""
    lines = Path(pku_fixtures).read_text(encoding="utf-8").splitlines()[:12]
    lines[5] = '{"prompt": broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fit_args(data: Path, root: Path) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/debug/tiny.yaml",
        f"--data.train_files=[{data}]",
        f"--trainer.default_root_dir={root}",
    ]


@pytest.mark.slow
def test_fit_on_invalid_json_line_prints_the_message_alone(bad_json_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "sacpo_lightning", *fit_args(bad_json_file, tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert f"sacpo fit: error: {bad_json_file}:6: line is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


@pytest.mark.parametrize("how", ["flag_first", "flag_last", "env"])
def test_debug_shows_the_traceback_of_a_user_error(how, bad_json_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    args = fit_args(bad_json_file, tmp_path / "run")
    if how == "flag_first":
        args = ["--debug", *args]
    elif how == "flag_last":
        args = [*args, "--debug"]
    else:
        monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.rstrip().endswith(
        f"sacpo fit: error: {bad_json_file}:6: line is not valid JSON (Expecting value at "
        "column 12). Write one JSON object per line, or set --data.on_invalid skip to drop "
        "such rows."
    )
    assert os.environ.get(DEBUG_ENV) == "1"  # --debug reaches the stages a pipeline starts


def test_user_error_wrapped_by_jsonargparse_is_found(tmp_path, monkeypatch, capsys):
    """A module's ``__init__`` check fails inside jsonargparse, which raises its own ValueError from ours."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    code = main(
        [
            "fit",
            "--config",
            "configs/debug/tiny.yaml",
            "--model.init_args.beta=0",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == "sacpo fit: error: --model.beta must be a finite number > 0, got 0.0"
    assert "Traceback" not in err and "Union subtypes" not in err


def test_a_bug_keeps_its_traceback(bad_json_file, tmp_path, monkeypatch):
    from sacpo_lightning.data import datamodule

    def broken(*args, **kwargs):
        raise KeyError("a bug in the loader")

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(datamodule, "load_records", broken)
    with pytest.raises(KeyError, match="a bug in the loader"):
        main(fit_args(bad_json_file, tmp_path / "run"))


def test_missing_prompt_file_and_model_are_user_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "none"),
                "--prompts",
                str(prompts),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"sacpo generate: error: Model {str(tmp_path / 'none')!r}: model folder" in err and "Traceback" not in err
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path),
                "--prompts",
                str(tmp_path / "missing.json"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ]
        )
        == 2
    )
    assert f"--prompts: prompt file {tmp_path / 'missing.json'} does not exist" in capsys.readouterr().err


def test_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependencyError) as info:
        require_extra("bitsandbytes", extra="qlora", feature="--model.policy.finetune=qlora", alternative="Use lora.")
    message = str(info.value)
    assert message.startswith(
        "--model.policy.finetune=qlora needs bitsandbytes (the qlora extra: pip install "
        '"sacpo-lightning[qlora]"); importing it failed: '
    )
    assert message.endswith(" Use lora.")
    assert isinstance(info.value, ImportError) and isinstance(info.value, UserError)


def test_find_user_error_follows_cause_and_context():
    inner = MissingFileError("data file x does not exist")
    try:
        try:
            raise inner
        except MissingFileError as err:
            raise ValueError("wrapped") from err
    except ValueError as outer:
        assert find_user_error(outer) is inner
    try:
        try:
            raise inner
        except MissingFileError:
            raise RuntimeError("during handling")  # noqa: B904 - the implicit __context__ is what is tested
    except RuntimeError as outer:
        assert find_user_error(outer) is inner
    assert find_user_error(KeyError("bug")) is None
    assert isinstance(inner, FileNotFoundError) and isinstance(inner, ValueError)


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)]
)
def test_debug_env_values(value, expected, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, value)
    assert debug_enabled() is expected


def test_diverging_fit_ends_with_nanguard_message_alone(tmp_path, monkeypatch, capsys):
    """A NaN loss (as from too high a learning rate) stops ``sacpo fit`` through NaNGuard: the message says what to
    change, with no traceback; it is a user error (status 2)."""
    from sacpo_lightning.callbacks.nan_guard import NonFiniteError

    from sacpo_lightning.modules import SafetyDPO

    original = SafetyDPO.compute_loss

    def diverging(self, batch):
        loss, metrics = original(self, batch)
        return loss * float("nan"), metrics

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(SafetyDPO, "compute_loss", diverging)
    args = ["fit", "--config", "configs/debug/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2"]  # the CLI adds NaNGuard (action stop) to every fit
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sacpo fit: error: NaNGuard stopped training: non-finite loss (nan) and gradients at "
                           "global step 0") and "--model.optim.lr" in last
    assert "Traceback" not in err
    assert issubclass(NonFiniteError, UserError) and issubclass(NonFiniteError, RuntimeError)


class _RefusingJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that refuses every request's API key."""

    def do_POST(self):  # noqa: N802 - http.server naming
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(401)
        self.end_headers()
        self.wfile.write(b'{"error": "invalid api key"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_judge():
    yield from serve(_RefusingJudge)


def test_judge_endpoint_failure_ends_evaluate_with_message_alone(
    refusing_judge, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from eval_prompts import write_eval_prompts

    from sacpo_lightning.evaluation.judge import JudgeError
    from sacpo_lightning.models.tiny import save_tiny_model

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.delenv("SACPO_TEST_JUDGE_KEY", raising=False)
    safety, helpful = write_eval_prompts(tmp_path)
    other = save_tiny_model(tmp_path / "other", seed=1)  # answers that differ from the baseline's go to the judge
    argv = ["evaluate", "--models", f"sft={tiny_model_dir}", f"other={other}", "--baseline", "sft",
            "--judges", "llm", "--judge_url", refusing_judge, "--judge_model", "judge",
            "--judge_api_key_env", "SACPO_TEST_JUDGE_KEY", "--prompts_safety", str(safety),
            "--prompts_helpful", str(helpful), "--max_new_tokens", "2", "--device", "cpu",
            "--output", str(tmp_path / "report")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"sacpo evaluate: error: Judge endpoint {refusing_judge}/chat/completions answered HTTP 401: "
        '{"error": "invalid api key"}. The endpoint refused the API key: set a valid key in the environment '
        "variable SACPO_TEST_JUDGE_KEY (judge_api_key_env)."
    )
    assert issubclass(JudgeError, UserError) and issubclass(JudgeError, RuntimeError)

    monkeypatch.setenv(DEBUG_ENV, "1")
    assert main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_model_files_turns_only_not_found_errors_into_user_errors():
    from sacpo_lightning.models.registry import model_files

    with pytest.raises(MissingFileError, match=r"Model 'org/none' could not be loaded: org/none is not a local folder "
                                               r"and is not a valid model identifier\. Give a local model folder"):
        with model_files("org/none"):
            raise OSError("org/none is not a local folder and is not a valid model identifier.")
    with pytest.raises(PermissionError, match="denied"):  # a disk problem, not a name: unchanged
        with model_files("org/none"):
            raise PermissionError("denied")


@pytest.mark.slow
def test_unknown_hub_model_offline_ends_generate_with_message_alone(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    env["HF_HUB_OFFLINE"] = "1"  # no network access is tried; the model is in no cache
    result = subprocess.run(
        [sys.executable, "-m", "sacpo_lightning", "generate", "--model", "sacpo-test-org/no-such-model", "--prompts",
         str(prompts), "--output", str(tmp_path / "out.jsonl")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sacpo generate: error: Model 'sacpo-test-org/no-such-model' could not be loaded: ")
    assert last.endswith("or a Hub id that can be downloaded from here (or is already in the Hugging Face cache).")
