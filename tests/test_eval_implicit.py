"""Implicit-reward preference accuracy: golden values, tie handling, batching, and a model against itself."""

from __future__ import annotations

import pytest
import torch

from sacpo_lightning.errors import UserError
from sacpo_lightning.evaluation.implicit import (
    implicit_accuracies,
    implicit_accuracy_from_log_ratios,
    pair_dataloader,
    pair_logps,
)
from sacpo_lightning.logprobs import sequence_logprobs
from sacpo_lightning.models.tiny import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("implicit") / "seed1", seed=1))


@pytest.fixture(scope="module")
def safety_set(shared_data):
    return {"train_files": [f"{shared_data}/pku_saferlhf/safety_pairs.fixtures.jsonl"], "source": "pku",
            "objective": "safe", "split": "all", "max_length": 96, "max_prompt_length": 48, "batch_size": 6}


def test_golden_values():
    """Margins (1, 0, -1, 2): two wins and one tie of four -> accuracy 0.5, ties 0.25, ties-as-half 0.625."""
    result = implicit_accuracy_from_log_ratios(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.zeros(4))
    assert (result.accuracy, result.ties, result.accuracy_ties_half, result.num_pairs) == (0.5, 0.25, 0.625, 4)
    assert result.mean_margin == pytest.approx(0.5)
    loose = implicit_accuracy_from_log_ratios(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.zeros(4), tie_eps=1.0)
    assert (loose.accuracy, loose.ties) == (0.25, 0.75)


def test_model_against_itself_is_all_ties(tiny_model_dir, safety_set):
    result = implicit_accuracies({"m": tiny_model_dir}, tiny_model_dir, {"safety": safety_set}, device="cpu")["m"]
    result = result["safety"]
    assert result["num_pairs"] == 36
    assert result["accuracy"] == 0.0 and result["ties"] == 1.0 and result["accuracy_ties_half"] == 0.5


def _log_ratios(model, ref, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected implicit rewards from ``pair_logps`` (each batch is chosen rows, then rejected rows)."""
    batches = list(loader)
    ratios = pair_logps(model, batches) - pair_logps(ref, batches)
    chosen, rejected, start = [], [], 0
    for batch in batches:
        n = batch["input_ids"].shape[0] // 2
        chosen.append(ratios[start : start + n])
        rejected.append(ratios[start + n : start + 2 * n])
        start += 2 * n
    return torch.cat(chosen), torch.cat(rejected)


def test_log_ratios_match_unbatched_and_swap(tiny_model_dir, other_model_dir, tiny_tokenizer, safety_set):
    from sacpo_lightning.evaluation.generation import load_generation_model

    a, _ = load_generation_model(tiny_model_dir, dtype="float32", device="cpu")
    b, _ = load_generation_model(other_model_dir, dtype="float32", device="cpu")
    kwargs = {**safety_set, "tokenizer": tiny_tokenizer}
    chosen, rejected = _log_ratios(a, b, pair_dataloader(**kwargs))
    # Unbatched: one pair per batch, no padding.
    one_c, one_r = _log_ratios(a, b, pair_dataloader(**{**kwargs, "batch_size": 1}))
    assert torch.allclose(chosen, one_c, atol=1e-3) and torch.allclose(rejected, one_r, atol=1e-3)
    batch = next(iter(pair_dataloader(**{**kwargs, "batch_size": 1})))
    with torch.no_grad():
        direct = sequence_logprobs(a(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"])
        direct -= sequence_logprobs(b(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"])
    assert direct[0].item() == pytest.approx(one_c[0].item(), abs=1e-4)
    forward = implicit_accuracy_from_log_ratios(chosen, rejected)
    # The library's path, with the same models as folders, gives the same accuracy, and the swap is its complement.
    specs = {"a": tiny_model_dir}
    assert implicit_accuracies(specs, other_model_dir, {"s": safety_set}, device="cpu")["a"]["s"] == pytest.approx(
        forward.to_dict(), abs=1e-4)
    backward = implicit_accuracies({"b": other_model_dir}, tiny_model_dir, {"s": safety_set}, device="cpu")["b"]["s"]
    assert forward.accuracy + backward["accuracy"] + forward.ties == pytest.approx(1.0)


def test_several_models_share_one_reference_pass(tiny_model_dir, tmp_path, shared_data):
    """Scoring two models in one call equals scoring each alone (the reference pass is shared, not changed)."""
    from sacpo_lightning.models.tiny import save_tiny_model

    other = str(save_tiny_model(tmp_path / "other", seed=3))
    pairs = {"safety": {"train_files": [f"{shared_data}/pku_saferlhf/safety_pairs.fixtures.jsonl"], "source": "pku",
                        "objective": "safe", "split": "all", "max_length": 96, "max_prompt_length": 48}}
    both = implicit_accuracies({"same": tiny_model_dir, "other": other}, tiny_model_dir, pairs, device="cpu")
    assert both["other"] == implicit_accuracies({"other": other}, tiny_model_dir, pairs, device="cpu")["other"]
    assert both["same"]["safety"]["ties"] == 1.0


def test_set_models_limit_which_models_are_scored(tiny_model_dir, other_model_dir, safety_set):
    """A set's ``models`` key scores only the named models on it (the same numbers as with every model); a model in
    no set is not loaded (a missing folder raises nothing); a name that is not scored is refused before loading."""
    alone = implicit_accuracies({"a": other_model_dir}, tiny_model_dir, {"s": safety_set}, device="cpu")["a"]["s"]
    sets = {"ab": {**safety_set, "models": ["a", "b"]}, "only_b": {**safety_set, "models": ["b"]}}
    result = implicit_accuracies({"a": other_model_dir, "b": other_model_dir, "unused": "/does/not/exist"},
                                 tiny_model_dir, sets, device="cpu")
    assert set(result) == {"a", "b"}
    assert set(result["a"]) == {"ab"} and set(result["b"]) == {"ab", "only_b"}
    assert result["a"]["ab"] == result["b"]["ab"] == result["b"]["only_b"] == alone
    with pytest.raises(UserError, match="implicit: models z are not scored"):
        implicit_accuracies({"a": other_model_dir}, "/does/not/exist", {"s": {**safety_set, "models": ["z"]}})


def test_against_another_model_is_the_difference_of_log_ratios(tiny_model_dir, other_model_dir, safety_set):
    """``against`` measures a model with another scored model as the reference: the same numbers as a run whose
    reference is that model, from the passes already made."""
    third = str(save_tiny_model(other_model_dir + "-third", seed=7))
    sets = {"s": {**safety_set, "against": {"b": "a"}}}
    result = implicit_accuracies({"a": other_model_dir, "b": third}, tiny_model_dir, sets, device="cpu")
    direct = implicit_accuracies({"b": third}, other_model_dir, {"s": safety_set}, device="cpu")["b"]["s"]
    assert result["b"]["s against a"] == pytest.approx(direct, abs=1e-6)
    assert result["b"]["s against a"] != result["b"]["s"]
    with pytest.raises(UserError, match=r"implicit.s.against: b against c needs two different models"):
        implicit_accuracies({"a": other_model_dir, "b": third}, tiny_model_dir,
                            {"s": {**safety_set, "against": {"b": "c"}}})


def test_bf16_precision_is_autocast_close_to_float32_and_checked(tiny_model_dir, other_model_dir, safety_set):
    exact = implicit_accuracies({"a": other_model_dir}, tiny_model_dir, {"s": safety_set}, device="cpu")["a"]["s"]
    bf16 = implicit_accuracies({"a": other_model_dir}, tiny_model_dir, {"s": safety_set}, device="cpu",
                               precision="bf16")["a"]["s"]
    assert bf16["num_pairs"] == exact["num_pairs"]
    assert bf16["mean_margin"] != exact["mean_margin"]  # rounded in bf16: not the float32 numbers
    assert bf16["mean_margin"] == pytest.approx(exact["mean_margin"], abs=0.05 * abs(exact["mean_margin"]) + 0.05)
    with pytest.raises(UserError, match="implicit_precision"):
        implicit_accuracies({"a": other_model_dir}, tiny_model_dir, {"s": safety_set}, precision="fp16")
