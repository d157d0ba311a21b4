"""The benchmark script runs end to end on the tiny model and ends with one JSON line of figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_dpo.py")


def _args(tiny_model_dir: str, shared_data: str, *extra: str) -> list[str]:
    data = os.path.join(shared_data, "pku_saferlhf", "safety_pairs.fixtures.jsonl")
    return ["--model", tiny_model_dir, "--data", data, "--steps", "2", "--warmup-steps", "1", "--seq-len", "64",
            "--pairs-per-step", "2", "--precision", "fp32", "--matmul-size", "128", "--device", "cpu", *extra]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dpo_benchmark_prints_a_json_line_last(tiny_model_dir, shared_data):
    proc = subprocess.run([sys.executable, SCRIPT, *_args(tiny_model_dir, shared_data)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["algo"] == "dpo" and result["examples"] == 4 and result["tokens"] > 0
    for key in ("pairs_per_s", "tokens_per_s", "peak_rss_mb", "model_flops_per_s", "matmul_flops_per_s", "mfu",
                "epoch_uncached_s", "epoch_cached_s", "cached_speedup"):
        assert result[key] > 0, key
    assert result["model_flops_per_s"] > result["model_flops_per_s_cached"] * result["epoch_cached_s"] / (
        result["epoch_uncached_s"])  # the live reference adds FLOPs


def test_kto_benchmark_in_process(tiny_model_dir, shared_data, capsys):
    assert _load_bench().main(_args(tiny_model_dir, shared_data, "--algo", "kto")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["algo"] == "kto" and result["pairs_per_s_cached"] > 0


def test_compare_trl_without_trl_says_how_to_get_it(tiny_model_dir, shared_data, monkeypatch):
    bench = _load_bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(SystemExit, match="needs TRL"):
        bench.main(_args(tiny_model_dir, shared_data, "--compare", "trl"))
    with pytest.raises(SystemExit, match="--algo dpo only"):
        bench.main(_args(tiny_model_dir, shared_data, "--compare", "trl", "--algo", "kto"))
