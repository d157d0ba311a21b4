"""Step modules on the tiny random Llama: reference handling, losses at initialisation, training, export."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sacpo_lightning.models.policy import LoraSettings, PolicySettings, load_causal_lm
from sacpo_lightning.modules import OptimSettings, RewardDPO, RewardKTO, SafetyDPO, SafetyKTO


def make_pair_batch(batch_size: int = 3, prompt_len: int = 5, response_len: int = 4, seed: int = 0) -> dict:
    """A (2B, L) pair batch with random tokens; prompts masked out of the labels, last row padded by two tokens."""
    g = torch.Generator().manual_seed(seed)
    length = prompt_len + response_len
    ids = torch.randint(10, 500, (2 * batch_size, length), generator=g)
    ids[batch_size:, :prompt_len] = ids[:batch_size, :prompt_len]  # chosen and rejected share the prompt
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    mask[-1, -2:] = 0
    labels[-1, -2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.arange(batch_size)}


def make_kto_batch(batch_size: int = 4, seed: int = 0) -> dict:
    pair = make_pair_batch(batch_size, seed=seed)
    n = batch_size
    rolled = {k: pair[k][:n].roll(1, dims=0) for k in ("input_ids", "attention_mask", "labels")}
    return {
        "input_ids": pair["input_ids"][:n],
        "attention_mask": pair["attention_mask"][:n],
        "labels": pair["labels"][:n],
        "desirable": torch.tensor([True, False] * (n // 2)),
        "index": torch.arange(n),
        "kl_input_ids": rolled["input_ids"],
        "kl_attention_mask": rolled["attention_mask"],
        "kl_labels": rolled["labels"],
    }


def build(module_cls, tiny_model_dir: str, finetune: str = "lora", **kwargs):
    policy = PolicySettings(name_or_path=tiny_model_dir, finetune=finetune, lora=LoraSettings(r=4, alpha=8))
    module = module_cls(policy=policy, optim=OptimSettings(lr=1e-2, warmup_ratio=0.0), **kwargs)
    module.configure_model()
    return module


def test_adapter_off_equals_base_model(tiny_model_dir):
    module = build(RewardDPO, tiny_model_dir)
    batch = make_pair_batch()
    # Make the adapter non-trivial so that "off" differs from "on".
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = module.sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["labels"])
    reference = module.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy = module.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(reference, expected)
    assert (policy - expected).abs().max() > 1e-3


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_dpo_loss_at_init_is_ln2(tiny_model_dir, finetune):
    """At initialisation the policy equals the reference, so every margin is 0 and the DPO loss is log 2."""
    module = build(RewardDPO, tiny_model_dir, finetune=finetune)
    loss, metrics = module.compute_loss(make_pair_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


def test_safety_kl_coefficient_is_beta_over_lambda(tiny_model_dir):
    module = SafetyDPO(policy=PolicySettings(name_or_path=tiny_model_dir), beta=0.1, lam=4.0)
    assert module.kl_coef == pytest.approx(0.025)
    assert module.step_metadata()["kl_coef"] == pytest.approx(0.025)
    assert SafetyKTO(policy=PolicySettings(name_or_path=tiny_model_dir), beta=0.2, lam=2.0).kl_coef == 0.1


@pytest.mark.parametrize(
    ("cls", "kwargs", "option"),
    [
        (RewardDPO, {"beta": 0.0}, "--model.beta"),
        (SafetyDPO, {"lam": -1.0}, "--model.lam"),
        (SafetyKTO, {"lam": 0.0}, "--model.lam"),
        (RewardDPO, {"label_smoothing": 0.7}, "--model.label_smoothing"),
        (RewardDPO, {"loss": "nope"}, "--model.loss"),
    ],
)
def test_invalid_options_name_the_option(cls, kwargs, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        cls(**kwargs)


def test_lora_target_mismatch_is_explained(tiny_model_dir):
    policy = PolicySettings(name_or_path=tiny_model_dir, lora=LoraSettings(target_modules=["c_attn"]))
    module = RewardDPO(policy=policy)
    with pytest.raises(ValueError, match="target_modules.*q_proj"):
        module.configure_model()


def _train(module, batch, steps: int = 5) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_lora_step_trains_adapter_and_keeps_base(tiny_model_dir):
    module = build(RewardDPO, tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if not p.requires_grad}
    losses = _train(module, make_pair_batch())
    assert losses[-1] < losses[0] - 0.05
    for name, p in module.policy.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name


def test_full_finetuning_reference_stays_frozen(tiny_model_dir):
    module = build(RewardDPO, tiny_model_dir, finetune="full")
    ref_before = {n: p.detach().clone() for n, p in module.ref_model.named_parameters()}
    losses = _train(module, make_pair_batch(), steps=3)
    assert losses[-1] < losses[0]
    for name, p in module.ref_model.named_parameters():
        assert torch.equal(p, ref_before[name])
        assert not p.requires_grad


def test_kto_step_trains(tiny_model_dir):
    module = build(RewardKTO, tiny_model_dir, auto_class_weights=False)
    batch = make_kto_batch()
    loss, metrics = module.compute_loss(batch)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # r = z0 = 0 at init: 1 - sigmoid(0)
    assert metrics["kl"].item() == 0.0
    losses = _train(module, batch)
    assert losses[-1] < losses[0]


def test_qlora_builds_and_trains_on_cpu(tiny_model_dir):
    policy = PolicySettings(name_or_path=tiny_model_dir, finetune="qlora", dtype="bfloat16",
                            lora=LoraSettings(r=4, alpha=8))
    module = RewardDPO(policy=policy)
    module.configure_model()
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.policy.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _train(module, make_pair_batch(), steps=3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)


def test_qlora_eval_pass_equals_training_pass(tiny_model_dir):
    """A no-grad eval pass (the reference of step 2) computes what a training pass computes, to the last bit: no
    4-bit layer switches to bitsandbytes' repacked bf16-scale CPU kernel (used on CPUs with AVX512-BF16)."""
    import bitsandbytes as bnb

    policy = PolicySettings(name_or_path=tiny_model_dir, finetune="qlora", qlora_compute_dtype="float32",
                            lora=LoraSettings(r=4, alpha=8))
    module = RewardDPO(policy=policy)
    module.configure_model()
    layers = [m for m in module.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    batch = make_pair_batch()
    train_pass = module.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"]).detach()
    module.policy.eval()
    with torch.no_grad():
        eval_pass = module.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    torch.testing.assert_close(eval_pass, train_pass, atol=0, rtol=0)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_reproduces_trained_policy(tiny_model_dir, tmp_path, finetune):
    module = build(RewardDPO, tiny_model_dir, finetune=finetune)
    batch = make_pair_batch()
    _train(module, batch, steps=3)
    out, merged_out = tmp_path / "export", tmp_path / "export_merged"
    module.export_pretrained(str(out))
    module.export_pretrained(str(merged_out), merged=True)
    assert (out / "sacpo_step.json").is_file()
    # adapter runs export the adapter chain only, unless asked for merged weights too
    assert (out / "model.safetensors").is_file() == (finetune == "full")
    assert (out / "adapter").is_dir() == (out / "sacpo_chain.json").is_file() == (finetune == "lora")
    assert (merged_out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".export*.tmp-*"))
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
        merged_model = AutoModelForCausalLM.from_pretrained(merged_out, dtype=torch.float32)
        for exported in (load_causal_lm(str(out)), merged_model):
            got = module.sequence_logps(exported, batch["input_ids"], batch["attention_mask"], batch["labels"])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
