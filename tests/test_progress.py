"""Progress lines: the format, the ETA, throttling in a log, in-place updates on a terminal (with a fake clock)."""

from __future__ import annotations

import io

import pytest

from sacpo_lightning import progress as progress_module
from sacpo_lightning.progress import Progress, format_clock, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def make(total=100, *, stream=None, **kwargs):
    clock = FakeClock()
    stream = stream if stream is not None else io.StringIO()
    bar = Progress(total, "generate policy", unit="responses", stream=stream, clock=clock, enabled=True, **kwargs)
    return bar, clock, stream


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "00:00"), (59.4, "00:59"), (61, "01:01"), (3600, "1:00:00"), (3725, "1:02:05"), (-3, "00:00")],
)
def test_format_clock(seconds, text):
    assert format_clock(seconds) == text


def test_line_has_count_rate_and_eta():
    bar, clock, _ = make()
    clock.now += 8.0
    bar.count = 20  # 20 in 8 s: 2.5/s, 80 left: 32 s
    assert bar.line() == "generate policy: 20/100 responses (2.50 responses/s, ETA 00:32)"
    bar.count = 100
    assert bar.line() == "generate policy: 100/100 responses (12.5 responses/s, done in 00:08)"
    bar.count = 0
    assert bar.line() == "generate policy: 0/100 responses (0.00 responses/s, ETA ?)"


def test_log_gets_a_line_every_every_s_seconds_not_every_item():
    bar, clock, stream = make(every_s=10.0)
    for _ in range(99):  # one item per second
        clock.now += 1.0
        bar.update()
    clock.now += 1.0
    bar.update()
    lines = stream.getvalue().splitlines()
    # lines at 10, 20, ... 90 s and the final one; no carriage returns in a log
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0] == "generate policy: 10/100 responses (1.00 responses/s, ETA 01:30)"
    assert lines[8] == "generate policy: 90/100 responses (1.00 responses/s, ETA 00:10)"
    assert lines[-1] == "generate policy: 100/100 responses (1.00 responses/s, done in 01:40)"


def test_every_n_items_also_prints():
    bar, clock, stream = make(total=10, every_s=1e9, every_n=4)
    for _ in range(10):
        clock.now += 0.01
        bar.update()
    counts = [line.split(":")[1].split()[0] for line in stream.getvalue().splitlines()]
    assert counts == ["4/10", "8/10", "10/10"]


def test_loop_within_quiet_s_prints_nothing():
    bar, clock, stream = make(total=50)  # quiet_s 2
    for _ in range(50):
        clock.now += 0.039
        bar.update()
    assert stream.getvalue() == ""
    bar, clock, stream = make(total=50)
    for _ in range(50):
        clock.now += 0.041  # done after 2.05 s
        bar.update()
    assert stream.getvalue().splitlines() == ["generate policy: 50/50 responses (24.4 responses/s, done in 00:02)"]


def test_quiet_s_zero_prints_the_final_line_once():
    bar, clock, stream = make(total=50, quiet_s=0)
    for _ in range(50):
        clock.now += 0.001
        bar.update()
    bar.close()
    assert stream.getvalue().splitlines() == ["generate policy: 50/50 responses (1000 responses/s, done in 00:00)"]


def test_terminal_updates_one_line_in_place():
    bar, clock, stream = make(total=4, stream=Terminal())
    for _ in range(4):
        clock.now += 1.0
        bar.update()
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("done in 00:04)\n")
    assert out.count("\r") == 4  # 3 refreshes (more than half a second apart) and the final line


def test_empty_and_disabled_loops_print_nothing():
    bar, _, stream = make(total=0)
    bar.close()
    assert stream.getvalue() == ""
    quiet = io.StringIO()
    with Progress(3, "x", stream=quiet, enabled=False) as off:
        off.update(3)
    assert quiet.getvalue() == ""


def test_other_ranks_print_nothing(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    stream = io.StringIO()
    with Progress(2, "x", stream=stream) as bar:
        bar.update(2)
    assert stream.getvalue() == ""


def test_progress_iterator_counts_items_after_the_loop_body():
    clock = FakeClock()
    stream = io.StringIO()
    seen = []
    for item in progress(["a", "b", "c"], desc="judge", stream=stream, clock=clock, enabled=True, every_n=2):
        clock.now += 2.0
        seen.append(item)
    assert seen == ["a", "b", "c"]
    assert stream.getvalue().splitlines() == ["judge: 2/3 (0.50/s, ETA 00:02)", "judge: 3/3 (0.50/s, done in 00:06)"]


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress(-1, "x")
    with pytest.raises(ValueError, match="every_n >= 1"):
        Progress(1, "x", every_n=0)


def test_generation_reports_progress(tiny_model_dir, tiny_tokenizer, capsys, monkeypatch):
    """generate_responses prints its progress to stderr (with quiet_s 0: one final line for a fast run)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sacpo_lightning.evaluation.generation import GenerationSettings, generate_responses

    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(progress_module, "DEFAULT_QUIET_S", 0.0)  # a tiny run is faster than the default
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    settings = GenerationSettings(max_new_tokens=2, batch_size=2, do_sample=False, template="raw")
    capsys.readouterr()  # transformers' own loading bar
    out = generate_responses(model, tiny_tokenizer, ["a", "bb", "ccc"], settings, desc="generate tiny")
    assert len(out) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("generate tiny: 3/3 responses (") and "done in" in err[0]
