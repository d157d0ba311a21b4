"""Weight-space merges and the token-level geometric mixture, on two different tiny random Llamas (seeds 0 and 1).

The sequence-level mixture and its importance weights are checked exactly on tabular models in
``test_mixture_sequence.py``; here the weights are checked against a teacher-forced recomputation on real models.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sacpo_lightning.io import atomic_directory, is_complete_directory
from sacpo_lightning.merge_kl import mixture_vs_merge_kl
from sacpo_lightning.merging import MERGE_METADATA_FILE, linear_merge_state_dicts, merge_model_folders
from sacpo_lightning.models import load_tokenizer
from sacpo_lightning.models.compat import MergeError, check_compatible
from sacpo_lightning.models.mixture import (
    GeometricMixtureLM,
    geometric_mixture_log_normalizer,
    geometric_mixture_logprobs,
    token_kl,
)
from sacpo_lightning.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

PROMPTS = ["Hello there, how are you today?", "Hi", "Tell me a short story about a cat."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merging")
    return save_tiny_model(root / "a", seed=0), save_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def merged(folders, tmp_path_factory):
    """Merges of A and B at q = 0, 0.5 and 1, keyed by q."""
    dir_a, dir_b = folders
    out = merge_model_folders(dir_a, dir_b, [0.0, 0.5, 1.0], output_root=tmp_path_factory.mktemp("merged"))
    return dict(zip([0.0, 0.5, 1.0], out, strict=True))


@pytest.fixture(scope="module")
def tokenizer(folders):
    return load_tokenizer(str(folders[0]))


def _weights(folder) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _states(dtype=torch.float32):
    return build_tiny_llama(0).to(dtype).state_dict(), build_tiny_llama(1).to(dtype).state_dict()


# ----------------------------------------------------------------------------------------------------------------------
# linear_merge_state_dicts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_merge_endpoints_are_exact(dtype):
    state_a, state_b = _states(dtype)
    at_0 = linear_merge_state_dicts(state_a, state_b, 0.0)
    at_1 = linear_merge_state_dicts(state_a, state_b, 1.0)
    assert list(at_0) == list(state_a)
    for key in state_a:
        assert at_0[key].dtype == dtype and torch.equal(at_0[key], state_a[key])
        assert torch.equal(at_1[key], state_b[key])
        assert at_0[key].data_ptr() != state_a[key].data_ptr(), "results must be copies, not views of the inputs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_merge_half_is_average_computed_in_float32(dtype):
    state_a, state_b = _states(dtype)
    merged = linear_merge_state_dicts(state_a, state_b, 0.5)
    for key, a in state_a.items():
        expected = ((a.float() + state_b[key].float()) / 2).to(dtype)
        assert merged[key].dtype == dtype
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_q_outside_unit_interval_is_refused(q, folders, tmp_path):
    state_a, state_b = _states()
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got"):
        linear_merge_state_dicts(state_a, state_b, q)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got"):
        merge_model_folders(*folders, [0.5, q], output_root=tmp_path)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got"):
        GeometricMixtureLM(build_tiny_llama(0), build_tiny_llama(1), q)
    assert not any(tmp_path.iterdir()), "nothing is written when an argument is bad"


def test_linear_merge_refuses_mismatched_keys_shapes_and_integer_buffers():
    a = {"w": torch.zeros(2, 3), "steps": torch.tensor([1, 2])}
    with pytest.raises(MergeError, match=r"only in A: \['steps'\]; only in B: \['extra'\]"):
        linear_merge_state_dicts(a, {"w": torch.zeros(2, 3), "extra": torch.tensor([1, 2])}, 0.5)
    with pytest.raises(MergeError, match=r"Shape mismatch for 'w': A has \(2, 3\), B has \(3, 2\)"):
        linear_merge_state_dicts(a, {"w": torch.zeros(3, 2), "steps": torch.tensor([1, 2])}, 0.5)
    with pytest.raises(MergeError, match=r"Non-floating tensor 'steps' differs"):
        linear_merge_state_dicts(a, {"w": torch.zeros(2, 3), "steps": torch.tensor([1, 3])}, 0.5)
    merged = linear_merge_state_dicts(a, {"w": torch.ones(2, 3), "steps": torch.tensor([1, 2])}, 0.25)
    assert torch.equal(merged["steps"], a["steps"]) and merged["steps"].data_ptr() != a["steps"].data_ptr()
    torch.testing.assert_close(merged["w"], torch.full((2, 3), 0.25))


# ----------------------------------------------------------------------------------------------------------------------
# merge_model_folders and check_compatible
# ----------------------------------------------------------------------------------------------------------------------


def test_merged_folders_match_endpoints_and_manual_average(folders, merged):
    weights_a, weights_b = _weights(folders[0]), _weights(folders[1])
    for q, folder in merged.items():
        assert is_complete_directory(folder)
        assert folder.name == f"merge_q{q:.2f}"
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        meta = json.loads((folder / MERGE_METADATA_FILE).read_text())
        assert meta["kind"] == "linear_merge" and meta["q"] == q
        assert meta["base"] == str(folders[0].resolve()) and meta["other"] == str(folders[1].resolve())
    for key in weights_a:
        assert torch.equal(_weights(merged[0.0])[key], weights_a[key])
        assert torch.equal(_weights(merged[1.0])[key], weights_b[key])
        torch.testing.assert_close(_weights(merged[0.5])[key], (weights_a[key] + weights_b[key]) / 2)
    reloaded = AutoModelForCausalLM.from_pretrained(merged[0.5])
    assert reloaded.dtype == torch.float32


def _save_model(folder, model, **save_kwargs):
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        build_tiny_tokenizer().save_pretrained(tmp)
    return folder


def test_sharded_checkpoints_and_dtype(folders, tmp_path):
    sharded = _save_model(tmp_path / "sharded", build_tiny_llama(0), max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    (out,) = merge_model_folders(sharded, folders[1], [0.0], [tmp_path / "out"], dtype="bfloat16")
    weights_a, weights_out = _weights(folders[0]), _weights(out)
    assert weights_out.keys() == weights_a.keys()
    for key, value in weights_a.items():
        assert weights_out[key].dtype == torch.bfloat16
        assert torch.equal(weights_out[key], value.to(torch.bfloat16))


def test_tied_embeddings_stay_tied(tmp_path):
    def tied(seed):
        model = build_tiny_llama(seed)
        model.config.tie_word_embeddings = True
        torch.manual_seed(seed)
        return type(model)(model.config)

    dir_a, dir_b = _save_model(tmp_path / "a", tied(0)), _save_model(tmp_path / "b", tied(1))
    (out,) = merge_model_folders(dir_a, dir_b, [0.25], output_root=tmp_path)
    model_a, model_b, merged = (AutoModelForCausalLM.from_pretrained(d) for d in (dir_a, dir_b, out))
    for model in (model_a, model_b, merged):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = torch.lerp(model_a.lm_head.weight, model_b.lm_head.weight, 0.25)
    torch.testing.assert_close(merged.lm_head.weight, expected, rtol=0, atol=1e-6)


def test_merge_is_deterministic(folders, tmp_path):
    first, second = merge_model_folders(*folders, [0.3, 0.3], [tmp_path / "one", tmp_path / "two"])
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between two runs"


def test_merge_output_arguments_are_checked(folders, tmp_path):
    with pytest.raises(ValueError, match="exactly one of output_dirs"):
        merge_model_folders(*folders, [0.5])
    with pytest.raises(ValueError, match="2 q values but 1 output folders"):
        merge_model_folders(*folders, [0.2, 0.8], [tmp_path / "x"])
    with pytest.raises(ValueError, match="not distinct"):
        merge_model_folders(*folders, [0.201, 0.202], output_root=tmp_path)


def test_different_architecture_is_refused(folders, tmp_path):
    narrow = tmp_path / "narrow"
    with atomic_directory(narrow) as tmp:
        build_tiny_llama(0, hidden_size=32).save_pretrained(tmp)
        build_tiny_tokenizer().save_pretrained(tmp)
    where = rf"{re.escape(str(folders[0]))} \(A\) and {re.escape(str(narrow))} \(B\)"
    message = rf"{where} have different architectures: config field 'hidden_size'"
    with pytest.raises(MergeError, match=message):
        check_compatible(folders[0], narrow)
    with pytest.raises(MergeError, match="'hidden_size' is 64 in A and 32 in B"):
        merge_model_folders(folders[0], narrow, [0.5], output_root=tmp_path / "out")
    with pytest.raises(MergeError, match="hidden_size"):
        GeometricMixtureLM.from_folders(folders[0], narrow, 0.5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["chat_template", "added_token"])
def test_different_tokenizer_is_refused(change, folders, tmp_path):
    other = tmp_path / "other"
    tok = build_tiny_tokenizer()
    if change == "chat_template":
        tok.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        expected = "the chat templates differ"
    else:
        tok.add_tokens(["<|tool|>"])
        expected = r"the vocabularies differ \(263 vs 264 tokens; first differences: '<\|tool\|>': None vs 263\)"
    with atomic_directory(other) as tmp:
        build_tiny_llama(1).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    where = rf"{re.escape(str(folders[0]))} \(A\) and {re.escape(str(other))} \(B\)"
    with pytest.raises(MergeError, match=rf"{where} have different tokenizers: {expected}"):
        check_compatible(folders[0], other)


def test_same_models_are_compatible(folders):
    check_compatible(*folders)


# ----------------------------------------------------------------------------------------------------------------------
# GeometricMixtureLM
# ----------------------------------------------------------------------------------------------------------------------


def test_geometric_mixture_logprobs_golden():
    """Two-token vocabulary: p_A = (0.8, 0.2), p_B = (0.2, 0.8). At q = 0.5 the geometric mean of both is
    (0.4, 0.4) before renormalisation, so the mixture is uniform (log 0.5 each); q = 0 / 1 give p_A / p_B."""
    logits_a, logits_b = torch.tensor([0.8, 0.2]).log(), torch.tensor([0.2, 0.8]).log()
    torch.testing.assert_close(geometric_mixture_logprobs(logits_a, logits_b, 0.5), torch.full((2,), math.log(0.5)))
    torch.testing.assert_close(geometric_mixture_logprobs(logits_a, logits_b, 0.0), logits_a)
    torch.testing.assert_close(geometric_mixture_logprobs(logits_a, logits_b, 1.0), logits_b)
    assert token_kl(logits_a, logits_a).item() == 0.0
    torch.testing.assert_close(token_kl(logits_a, logits_b), torch.tensor(0.6 * math.log(4)))


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")


def test_mixture_logprobs_are_normalised_and_match_endpoints(folders, batch):
    mixture = GeometricMixtureLM.from_folders(*folders, 0.5)
    model_a, model_b = mixture.model_a, mixture.model_b
    with torch.no_grad():
        logp_a = model_a(**batch).logits.log_softmax(-1)
        logp_b = model_b(**batch).logits.log_softmax(-1)
        out = mixture(**batch).logits
        torch.testing.assert_close(out.logsumexp(-1), torch.zeros(out.shape[:-1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(out, (0.5 * logp_a + 0.5 * logp_b).log_softmax(-1))
        assert not torch.allclose(out, logp_a, atol=1e-3)
        mixture.q = 0.0
        torch.testing.assert_close(mixture(**batch).logits, logp_a)
        mixture.q = 1.0
        torch.testing.assert_close(mixture(**batch).logits, logp_b)


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_greedy_generation_matches_the_endpoint_model(q, folders, batch, tokenizer):
    mixture = GeometricMixtureLM.from_folders(*folders, q)
    assert batch["attention_mask"][1, 0] == 0, "the second prompt is left-padded"
    endpoint = mixture.model_a if q == 0.0 else mixture.model_b
    kwargs = {"max_new_tokens": 12, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    expected = endpoint.generate(**batch, do_sample=False, **kwargs)
    assert torch.equal(mixture.generate(batch["input_ids"], batch["attention_mask"], **kwargs), expected)


def test_generation_stops_rows_at_eos_and_pads_them(folders, batch, tokenizer):
    mixture = GeometricMixtureLM.from_folders(*folders, 0.5)
    prompt_len = batch["input_ids"].shape[1]
    free = mixture.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, eos_token_id=[])
    assert free.shape == (2, prompt_len + 6)
    stop = int(free[0, prompt_len + 1])  # pretend row 0's second new token is an EOS
    pad = tokenizer.pad_token_id
    out = mixture.generate(**batch, max_new_tokens=6, eos_token_id=stop, pad_token_id=pad)
    new = out[:, prompt_len:]
    assert torch.equal(new[0, :2], free[0, prompt_len : prompt_len + 2])
    assert (new[0, 2:] == pad).all()
    first_stop = (new[1] == stop).nonzero()
    end = int(first_stop[0]) + 1 if len(first_stop) else new.shape[1]
    assert torch.equal(new[1, :end], free[1, prompt_len : prompt_len + end])

    generator = torch.Generator().manual_seed(0)
    sampled = mixture.generate(**batch, max_new_tokens=4, do_sample=True, top_p=0.9, generator=generator)
    generator = torch.Generator().manual_seed(0)
    again = mixture.generate(**batch, max_new_tokens=4, do_sample=True, top_p=0.9, generator=generator)
    assert torch.equal(sampled, again)


def test_log_weights_match_teacher_forced_normalisers(folders, batch, tokenizer):
    """``generate``'s log W (KV caches, left padding, an EOS mid-batch) equals sum_t log Z_t recomputed by running
    both models over the finished sequences, counting each row's tokens up to and including its EOS."""
    q = 0.3
    mixture = GeometricMixtureLM.from_folders(*folders, q)
    prompt_len = batch["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 6, "do_sample": True, "pad_token_id": tokenizer.pad_token_id}
    free = mixture.generate(**batch, eos_token_id=[], generator=torch.Generator().manual_seed(0), **kwargs)
    eos = int(free[0, prompt_len + 1])  # row 0 ends at its second token, the other row later (or never)
    out = mixture.generate(**batch, eos_token_id=eos, generator=torch.Generator().manual_seed(0),
                           return_log_weights=True, **kwargs)
    sequences, log_w = out
    new = sequences[:, prompt_len:]
    real = torch.ones_like(new)
    for row in range(new.shape[0]):
        ends = (new[row] == eos).nonzero()
        if len(ends):
            real[row, int(ends[0]) + 1 :] = 0
    assert real[0].tolist() == [1, 1, 0, 0, 0, 0][: new.shape[1]]
    mask = torch.cat([batch["attention_mask"], real], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = [m(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
                  for m in (mixture.model_a, mixture.model_b)]
    # The logits at position prompt_len - 1 + t predict generated token t.
    log_z = geometric_mixture_log_normalizer(logits[0], logits[1], q)[:, prompt_len - 1 : -1]
    expected = (log_z.double() * real).sum(-1)
    torch.testing.assert_close(log_w, expected, rtol=0, atol=1e-4)
    assert (log_w < 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# mixture_vs_merge_kl
# ----------------------------------------------------------------------------------------------------------------------


def test_mixture_vs_merge_kl(folders, merged, tokenizer):
    num_tokens = sum(len(ids) for ids in tokenizer(PROMPTS)["input_ids"])
    for q in (0.0, 1.0):
        kl = mixture_vs_merge_kl(*folders, merged[q], q, PROMPTS, tokenizer, batch_size=2)
        assert kl.num_tokens == num_tokens
        assert abs(kl.mean_kl) < 1e-6
    mean_kl, count = mixture_vs_merge_kl(*folders, merged[0.5], 0.5, PROMPTS, tokenizer, batch_size=2)
    assert count == num_tokens
    assert mean_kl > 1e-4
    # Batching does not change the result (right padding is excluded).
    single = mixture_vs_merge_kl(*folders, merged[0.5], 0.5, PROMPTS, batch_size=1)
    assert single.num_tokens == num_tokens
    assert single.mean_kl == pytest.approx(mean_kl, rel=1e-4)
