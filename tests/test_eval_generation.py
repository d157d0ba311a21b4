"""Batched generation on prompt sets: batching equivalence, left padding, stop strings, output format and cache."""

from __future__ import annotations

import json

import pytest
import torch

from sacpo_lightning.evaluation import generation as gen
from sacpo_lightning.evaluation.generation import (
    GenerationSettings,
    format_prompt,
    generate_responses,
    generate_to_file,
    load_generation_model,
    load_prompts,
    parse_model_spec,
    read_generations,
    truncate_at_stop,
)

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["Hi", "How do I bake bread at home?", "Tell me a joke", "What is the capital of France, please?"]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_generation_model(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": p, "category": f"c{i % 2}"} for i, p in enumerate(PROMPTS)]))
    return path


def test_batched_greedy_equals_unbatched(loaded):
    model, tokenizer = loaded
    one = generate_responses(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=1))
    many = generate_responses(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=10, batch_size=3))
    assert one == many
    assert all(isinstance(r, str) for r in one) and any(one)


def test_left_padding():
    ids, mask = gen._left_pad([[5, 6, 7], [9]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stop_strings_cut_the_response(loaded):
    model, tokenizer = loaded
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    full = generate_responses(model, tokenizer, PROMPTS[:2], settings)
    stop = full[1][4:6]
    assert stop
    cut = generate_responses(model, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=12, batch_size=2,
                                                                               stop=[stop]))
    assert cut == [truncate_at_stop(r, [stop]).strip() for r in full]
    assert stop not in cut[1]
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == "abc "


def test_sampling_is_seeded(loaded):
    model, tokenizer = loaded
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, seed=3, batch_size=2)
    assert generate_responses(model, tokenizer, PROMPTS, settings) == generate_responses(
        model, tokenizer, PROMPTS, settings
    )


def test_templates(tiny_tokenizer):
    assert format_prompt(tiny_tokenizer, "Hi?", "pku") == "BEGINNING OF CONVERSATION: USER: Hi? ASSISTANT:"
    assert format_prompt(tiny_tokenizer, "Hi?", "Q: {input}\nA:") == "Q: Hi?\nA:"
    assert format_prompt(tiny_tokenizer, "Hi?", "chat") == "<|user|>\nHi?<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="--template"):
        GenerationSettings(template="nope")


def test_output_format_and_cache(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "gen" / "sft.jsonl"
    settings = GenerationSettings(max_new_tokens=6, batch_size=4, device="cpu")
    generate_to_file(tiny_model_dir, prompt_file, out, settings, name="sft")
    rows = read_generations(out)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["category"] for r in rows] == ["c0", "c1", "c0", "c1"]
    assert all(set(r) == {"prompt", "category", "response", "model"} and r["model"] == "sft" for r in rows)
    before = out.stat().st_mtime_ns

    def no_load(*args, **kwargs):
        raise AssertionError("the cached file should have been reused")

    monkeypatch.setattr(gen, "load_generation_model", no_load)
    # Batch size does not change greedy output, so it does not invalidate the cache.
    generate_to_file(tiny_model_dir, prompt_file, out, GenerationSettings(max_new_tokens=6, batch_size=1),
                     name="sft")
    assert out.stat().st_mtime_ns == before
    with pytest.raises(AssertionError, match="cached"):
        generate_to_file(tiny_model_dir, prompt_file, out, GenerationSettings(max_new_tokens=7), name="sft")
    out.write_text(out.read_text() + "\n")  # an edited output no longer matches its sidecar
    with pytest.raises(AssertionError, match="cached"):
        generate_to_file(tiny_model_dir, prompt_file, out, settings, name="sft")


def test_mixture_spec(tiny_model_dir, loaded):
    spec = parse_model_spec(f"mix:{tiny_model_dir}+{tiny_model_dir}@0.5")
    assert spec.is_mixture and spec.q == 0.5 and str(spec) == f"mix:{tiny_model_dir}+{tiny_model_dir}@0.5"
    mixture, tokenizer = load_generation_model(spec, dtype="float32", device="cpu")
    settings = GenerationSettings(max_new_tokens=6, batch_size=2)
    # A mixture of a model with itself is that model.
    assert generate_responses(mixture, tokenizer, PROMPTS, settings) == generate_responses(*loaded, PROMPTS, settings)
    for bad in ("mix:a@0.5", "mix:a+b@x", "mix:a+b@1.5", "mix:a+b"):
        with pytest.raises(ValueError, match="mix"):
            parse_model_spec(bad)


def test_prompt_files(tmp_path, shared_data):
    assert len(load_prompts(f"{shared_data}/eval/safety_problem.json")) == 83
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"prompt": "b", "category": "x"}\n')
    assert load_prompts(jsonl) == [{"prompt": "a", "category": None}, {"prompt": "b", "category": "x"}]
    jsonl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: 'prompt'"):
        load_prompts(jsonl)
    jsonl.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(jsonl)



# ----------------------------------------------------------------------------------------------------------------------
# Sequence-level mixture estimates: weighted samples, effective sample size, resampled pick
# ----------------------------------------------------------------------------------------------------------------------

SEQ = {"do_sample": True, "sequence_level": True, "samples_per_prompt": 4, "max_new_tokens": 5, "batch_size": 6,
       "device": "cpu", "dtype": "float32", "seed": 1}


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"do_sample": False}, "--do_sample"),
        ({"temperature": 0.7}, "--temperature"),
        ({"top_p": 0.9}, "--top_p"),
        ({"samples_per_prompt": 1}, "--samples_per_prompt >= 2"),
        ({"samples_per_prompt": 0}, "--samples_per_prompt must be >= 1"),
        ({"sequence_level": False}, "--sequence_level true"),
    ],
)
def test_sequence_level_settings_are_checked(kwargs, option):
    with pytest.raises(ValueError, match=option):
        GenerationSettings(**{**SEQ, **kwargs})


def test_sequence_level_settings_enter_the_cache_key(tiny_model_dir, prompt_file):
    spec = parse_model_spec(tiny_model_dir)
    plain = GenerationSettings(do_sample=True)
    # Left out at their defaults, so files cached before these settings existed keep their hash.
    assert not {"sequence_level", "samples_per_prompt"} & set(plain.cache_fields())
    hashes = {gen.settings_hash(spec, prompt_file, s, "m") for s in (
        plain, GenerationSettings(**SEQ), GenerationSettings(**{**SEQ, "samples_per_prompt": 5}))}
    assert len(hashes) == 3


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from sacpo_lightning.models.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("other") / "step2", seed=1))


def _check_weighted_rows(rows, n):
    for r in rows:
        samples = r["samples"]
        assert len(samples) == n and set(samples[0]) == {"response", "log_weight", "weight"}
        log_w = torch.tensor([s["log_weight"] for s in samples], dtype=torch.float64)
        weights = torch.tensor([s["weight"] for s in samples], dtype=torch.float64)
        torch.testing.assert_close(weights, log_w.softmax(-1))
        assert 1.0 - 1e-9 <= r["ess"] <= n + 1e-9
        assert r["ess"] == pytest.approx(float(1.0 / (weights**2).sum()))
        assert r["response"] == samples[r["resampled_index"]]["response"]


def test_sequence_level_generation_file(tiny_model_dir, other_model_dir, prompt_file, tmp_path, monkeypatch):
    settings = GenerationSettings(**SEQ)
    mix = f"mix:{tiny_model_dir}+{other_model_dir}@0.3"
    out = tmp_path / "mix.jsonl"
    generate_to_file(mix, prompt_file, out, settings, name="mix")
    rows = read_generations(out)
    assert [r["prompt"] for r in rows] == PROMPTS and all(r["model"] == "mix" for r in rows)
    _check_weighted_rows(rows, 4)
    # The picks are sampling-importance-resampling draws: one seeded generator over the prompts in file order.
    from sacpo_lightning.importance import resample

    generator = torch.Generator().manual_seed(settings.seed)
    assert [r["resampled_index"] for r in rows] == [int(resample(torch.tensor(
        [s["log_weight"] for s in r["samples"]], dtype=torch.float64), 1, generator=generator)[0]) for r in rows]
    log_w = [s["log_weight"] for r in rows for s in r["samples"]]
    # The two models differ, so the token-level normalisers are < 1 and differ between samples.
    assert max(log_w) < 0 and len(set(log_w)) > 1
    assert any(r["ess"] < 4 - 1e-6 for r in rows)

    # A single folder is its own sequence-level target: equal weights, ESS = N.
    single = tmp_path / "single.jsonl"
    generate_to_file(tiny_model_dir, prompt_file, single, settings, name="sft")
    single_rows = read_generations(single)
    _check_weighted_rows(single_rows, 4)
    assert all(s["log_weight"] == 0.0 for r in single_rows for s in r["samples"])
    assert all(r["ess"] == pytest.approx(4.0) for r in single_rows)

    # Same settings: cached; another number of samples: regenerated.
    def no_load(*args, **kwargs):
        raise AssertionError("the cached file should have been reused")

    monkeypatch.setattr(gen, "load_generation_model", no_load)
    generate_to_file(mix, prompt_file, out, settings, name="mix")
    with pytest.raises(AssertionError, match="cached"):
        generate_to_file(mix, prompt_file, out, GenerationSettings(**{**SEQ, "samples_per_prompt": 3}), name="mix")


def test_generate_samples_is_seeded_and_generate_responses_takes_one(tiny_model_dir, other_model_dir):
    mixture, tokenizer = load_generation_model(f"mix:{tiny_model_dir}+{other_model_dir}@0.3", dtype="float32",
                                               device="cpu")
    settings = GenerationSettings(**SEQ)
    first = gen.generate_samples(mixture, tokenizer, PROMPTS[:2], settings)
    assert first == gen.generate_samples(mixture, tokenizer, PROMPTS[:2], settings)
    assert [len(s) for s in first] == [4, 4]
    with pytest.raises(ValueError, match="generate_samples"):
        generate_responses(mixture, tokenizer, PROMPTS[:2], settings)
