"""``precision: auto``: bf16 mixed precision only where bf16 is native."""

from __future__ import annotations

import pytest

from sacpo_lightning import precision
from sacpo_lightning.precision import resolve_precision


@pytest.fixture
def cpu_flags(monkeypatch):
    def set_flags(flags: tuple[str, ...]) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
        monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)

    return set_flags


def test_cpu_without_native_bf16_gets_float32(cpu_flags):
    cpu_flags(())
    value, reason = resolve_precision("auto", "auto")
    assert value == "32-true" and "without AVX512_BF16" in reason


@pytest.mark.parametrize("flags", [("avx512_bf16",), ("amx_bf16",), ("avx512_bf16", "amx_bf16")])
def test_cpu_with_native_bf16_gets_bf16_mixed(cpu_flags, flags):
    cpu_flags(flags)
    value, reason = resolve_precision("auto", "cpu")
    assert value == "bf16-mixed" and flags[0] in reason


def test_gpu_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision.torch.cuda, "get_device_name", lambda: "Some GPU")
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "gpu")[0] == "bf16-mixed"
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cuda")[0] == "32-true"


def test_explicit_precision_passes_through(cpu_flags):
    cpu_flags(())
    assert resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
    assert resolve_precision("16-mixed", "gpu")[0] == "16-mixed"


def test_cpuinfo_flags_are_read(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    real_path = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: real_path(info) if p == "/proc/cpuinfo" else real_path(p))
    precision.cpu_bf16_flags.cache_clear()
    try:
        assert precision.cpu_bf16_flags() == ("avx512_bf16",)
        info.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
        precision.cpu_bf16_flags.cache_clear()
        assert precision.cpu_bf16_flags() == ()
    finally:
        precision.cpu_bf16_flags.cache_clear()


def test_trainer_takes_auto_and_records_the_choice(cpu_flags):
    from sacpo_lightning.cli import SacpoTrainer

    cpu_flags(())
    trainer = SacpoTrainer(precision="auto", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    assert str(trainer.precision) == "32-true"
    assert trainer.precision_choice["requested"] == "auto" and trainer.precision_choice["resolved"] == "32-true"


def test_auto_dtypes_of_the_policy_follow_native_bf16(cpu_flags):
    from sacpo_lightning.models.policy import PolicySettings

    cpu_flags(())
    settings = PolicySettings(finetune="qlora", dtype="auto", qlora_compute_dtype="auto")
    assert (settings.dtype, settings.qlora_compute_dtype) == ("float32", "float32")
    cpu_flags(("amx_bf16",))
    settings = PolicySettings(finetune="qlora", dtype="auto", qlora_compute_dtype="auto")
    assert (settings.dtype, settings.qlora_compute_dtype) == ("bfloat16", "bfloat16")
    assert PolicySettings(qlora_compute_dtype="float16").qlora_compute_dtype == "float16"
    with pytest.raises(ValueError, match="qlora_compute_dtype must be one of"):
        PolicySettings(qlora_compute_dtype="int8")
