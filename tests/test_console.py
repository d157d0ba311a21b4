"""Third-party console noise is filtered at its source, one message of one library at a time."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sacpo_lightning.console import LOG_FILTERS, install_console_filters

ROOT = Path(__file__).resolve().parents[1]

NOISE = (
    "kernels-community",
    "is_gradient_checkpointing",
    "LeafSpec",
    "litlogger",
    "💡 Tip",
)


def shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning ``message`` of ``category`` raised from ``module`` reaches the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # the test session's own filters (pyproject.toml) do not count here
        warnings.simplefilter("default")
        install_console_filters()
        warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)
    return len(caught) == 1


@pytest.mark.parametrize(
    ("message", "category", "module", "expected"),
    [
        (
            "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
            "instead.",
            FutureWarning,
            "transformers.modeling_utils",
            False,
        ),
        (
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
            "`activation_checkpointing_enable` instead.",
            FutureWarning,
            "transformers.modeling_utils",
            False,
        ),
        (
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
            "treespec.is_leaf()` instead.",
            FutureWarning,
            "lightning.pytorch.utilities._pytree",
            False,
        ),
        # other warnings of the same libraries, and the same text from another module or of another category
        (
            "`use_return_dict` is deprecated and will be removed in v6.",
            FutureWarning,
            "transformers.modeling_utils",
            True,
        ),
        ("`is_gradient_checkpointing` is deprecated", UserWarning, "transformers.modeling_utils", True),
        ("`is_gradient_checkpointing` is deprecated", FutureWarning, "my_project.train", True),
        ("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "my_project.trees", True),
        ("The dataloader does not have many workers", UserWarning, "lightning.pytorch.utilities._pytree", True),
        ("Something else is deprecated", FutureWarning, "lightning.pytorch.trainer.trainer", True),
    ],
)
def test_warning_filters_hide_only_their_message(message, category, module, expected):
    assert shown(message, category, module) is expected


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_messages():
    """The messages Lightning's ``rank_zero_info`` logs, caught on the ``lightning`` loggers' way to the console."""
    handler = ListHandler()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


def test_litlogger_tip_is_dropped_other_lightning_info_is_not(lightning_messages):
    from lightning.pytorch.utilities import rank_zero_info

    install_console_filters()
    rank_zero_info(
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
        "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger."
    )
    rank_zero_info("GPU available: False, used: False")
    rank_zero_info("Tip: set --trainer.max_steps to stop earlier")
    assert lightning_messages == ["GPU available: False, used: False", "Tip: set --trainer.max_steps to stop earlier"]


def test_bitsandbytes_kernels_message_is_dropped_other_records_are_not():
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        install_console_filters()
        install_console_filters()  # idempotent
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
            "already `pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
        logger.warning("quantization state is stale")
        logging.getLogger("bitsandbytes.cextension").warning("from kernels-community: another logger, kept")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["quantization state is stale"]
    assert logger.filters.count(LOG_FILTERS[0]) == 1


@pytest.mark.slow
def test_tiny_fit_console_has_no_third_party_noise(tmp_path):
    """A tiny fit imports peft (and with it bitsandbytes), checks gradient checkpointing and builds a Trainer with a
    CSV logger: each of the filtered messages is printed there without the filters."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacpo_lightning",
            "fit",
            "--config",
            "configs/debug/tiny.yaml",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "Exported safety_dpo policy" in console and "validation at step 2" in console
    assert [noise for noise in NOISE if noise in console] == []
    assert "Warning" not in console, console


@pytest.fixture
def transformers_console():
    """transformers' tqdm hook and the modeling_utils logger as before the test, and a handler on that logger."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.set_tqdm_hook(None)
    logger = logging.getLogger("transformers.modeling_utils")
    handler = ListHandler()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    hf_logging.set_tqdm_hook(previous)


def load_and_save_score_backbone(model_dir: str, out: Path) -> None:
    from sacpo_lightning.models.classifier import load_sequence_classifier

    model = load_sequence_classifier(model_dir, num_labels=1, new_head=True)
    model.save_pretrained(out)


def test_tiny_score_model_load_and_save_without_bars_or_load_report(
    tiny_model_dir, tmp_path, transformers_console, capsys, caplog
):
    """Without the hook transformers prints its tqdm bars; with it a load within two seconds prints nothing; the load
    report of the new head (score.weight missing, lm_head.weight unexpected) becomes one line of this library."""
    load_and_save_score_backbone(tiny_model_dir, tmp_path / "plain")
    plain = capsys.readouterr().err
    assert "Loading weights:" in plain and "Writing model shards:" in plain and "it/s]" in plain

    install_console_filters()
    with caplog.at_level(logging.INFO):
        load_and_save_score_backbone(tiny_model_dir, tmp_path / "filtered")
    console = capsys.readouterr()
    assert "Loading weights" not in console.err + console.out and "Writing model shards" not in console.err
    assert "it/s" not in console.err
    assert not [m for m in transformers_console if "LOAD REPORT" in m]
    assert ("LlamaForSequenceClassification on " + tiny_model_dir + ": new score head (score.weight, 1 output) "
            "initialised; the checkpoint has none") in caplog.messages
    assert (tmp_path / "filtered" / "model.safetensors").is_file()


def test_load_report_is_dropped_only_for_missing_and_unexpected_weights(transformers_console):
    from sacpo_lightning.console import quiet_load_report

    logger = logging.getLogger("transformers.modeling_utils")
    missing = "LlamaForSequenceClassification LOAD REPORT from: x\nscore.weight | MISSING |"
    mismatch = "LlamaForSequenceClassification LOAD REPORT from: x\nscore.weight | MISMATCH | ckpt: [2, 64]"
    with quiet_load_report():
        logger.warning(missing)
        logger.warning(mismatch)
        logger.warning("Some other warning of transformers' model loading")
    logger.warning(missing)  # outside the strict loads the report shows
    assert transformers_console == [mismatch, "Some other warning of transformers' model loading", missing]
    assert logger.filters == []


def test_slow_transformers_load_prints_a_progress_line_and_other_bars_are_kept(
    transformers_console, monkeypatch, capsys
):
    from transformers.utils import logging as hf_logging

    from sacpo_lightning import progress

    install_console_filters()
    monkeypatch.setattr(progress, "DEFAULT_QUIET_S", 0.0)  # as if the load took longer than two seconds
    assert list(hf_logging.tqdm(range(3), desc="Loading weights")) == [0, 1, 2]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loading weights: 3/3 tensors (") and "done in 00:00)" in lines[0]

    other = hf_logging.tqdm(range(2), desc="Converting and de-quantizing GGUF tensors...")
    assert type(other).__module__.startswith("tqdm")
    other.close()
    capsys.readouterr()

    hf_logging.disable_progress_bar()
    try:
        assert list(hf_logging.tqdm(range(3), desc="Loading weights")) == [0, 1, 2]
    finally:
        hf_logging.enable_progress_bar()
    assert capsys.readouterr().err == ""


def test_reference_cache_is_off_quietly_for_score_models_and_warns_otherwise(lightning_messages):
    from types import SimpleNamespace

    import lightning as L
    from sacpo_lightning.callbacks import ReferenceCache

    from sacpo_lightning.models.policy import PolicySettings
    from sacpo_lightning.modules import CostModelModule

    trainer = SimpleNamespace(datamodule=None)
    cost = CostModelModule(policy=PolicySettings(name_or_path="tiny-random-llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ReferenceCache()._usable(trainer, cost) is False
    assert caught == []
    assert lightning_messages == ["Reference cache: off (CostModelModule has no reference policy)."]

    with pytest.warns(UserWarning, match="needs a sacpo_lightning step module and PreferenceDataModule, got "
                                         "LightningModule and NoneType; it is off"):
        assert ReferenceCache()._usable(trainer, L.LightningModule()) is False


def test_gguf_conversion_bar_becomes_progress_lines_and_is_restored(capsys):
    """The GGUF conversion's tqdm bar (a plain ``tqdm.auto`` bar, one carriage-return frame per tensor in a log) is
    a progress line while :func:`gguf_conversion_progress` runs; other bars of that module stay tqdm's, and the
    module's ``tqdm`` is restored afterwards."""
    import importlib

    from sacpo_lightning.console import GGUF_BAR_MODULE, ProgressBar, gguf_conversion_progress

    module = importlib.import_module(GGUF_BAR_MODULE)
    original = module.tqdm
    with gguf_conversion_progress():
        bar = module.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")
        assert isinstance(bar, ProgressBar) and list(bar) == [0, 1, 2]
        other = module.tqdm(range(2), desc="something else", disable=True)
        assert not isinstance(other, ProgressBar)
    assert module.tqdm is original
    assert "Converting and de-quantizing" not in capsys.readouterr().err
    # the conversion still draws its bar through that module-level name
    import inspect

    assert "tqdm(reader.tensors" in inspect.getsource(module)


def test_kernels_offline_trust_message_of_the_bitsandbytes_kernel_is_dropped_others_are_not():
    """With transformers >= 5.25 the ``kernels`` package is installed; offline, bitsandbytes' import-time look for
    its optional CPU kernel makes it log a skipped trust check for that one repository."""
    logger = logging.getLogger("kernels._internals.hf_hub")
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        install_console_filters()
        logger.warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode."
        )
        logger.warning(
            "Skipping publisher trust check for 'someone/custom-kernel' because Hugging Face Hub is in offline mode."
        )
    finally:
        logger.removeHandler(handler)
    assert handler.messages == [
        "Skipping publisher trust check for 'someone/custom-kernel' because Hugging Face Hub is in offline mode."
    ]
