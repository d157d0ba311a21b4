"""Adapter chains: step 2 trains a second adapter on the frozen step-1 adapter, so its reference is exactly step 1;
adapter exports; P-SACPO merges as adapter scales; the reference checks of the step classes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sacpo_lightning.merging import merge_model_folders
from sacpo_lightning.models.chain import CHAIN_FILE, read_chain
from sacpo_lightning.models.policy import LoraSettings, PolicySettings, load_causal_lm
from sacpo_lightning.modules import OptimSettings, RewardDPO, SafetyDPO
from tests.test_modules import make_pair_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(path: str, finetune: str) -> PolicySettings:
    # float32 compute for QLoRA too, so that equal computations give equal numbers to the last bit
    return PolicySettings(name_or_path=path, finetune=finetune, lora=LoraSettings(r=4, alpha=8),
                          qlora_compute_dtype="float32")


def _train(module, batch, steps: int, lr: float = 2e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _logps(module, model, batch):
    with torch.no_grad():
        return module.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def _step1(tiny_model_dir, tmp_path, finetune, *, beta=0.1, merged=False):
    step1 = RewardDPO(policy=_settings(tiny_model_dir, finetune), optim=OptimSettings(lr=2e-2), beta=beta)
    step1.configure_model()
    batch = make_pair_batch(seed=1)
    _train(step1, batch, steps=4)
    step1.policy.eval()
    out = tmp_path / f"step1_{finetune}"
    step1.export_pretrained(str(out), merged=merged)
    return step1, out


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_step2_reference_is_the_trained_step1_policy(tiny_model_dir, tmp_path, finetune):
    """Step 2 from an adapter export: adapter off = the trained step-1 policy (same quantized base, same adapter).

    The negative control is the old hand-off, a merged export re-loaded as the base: under QLoRA it quantizes
    bf16/float32(SFT + Delta_1) instead of using NF4(SFT) + Delta_1 and misses by far more than the tolerance.
    """
    step1, out = _step1(tiny_model_dir, tmp_path, finetune, merged=True)
    batch = make_pair_batch(seed=2)
    trained = step1.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"]).detach()

    step2 = SafetyDPO(policy=_settings(str(out), finetune), beta=0.1, lam=2.0)
    step2.configure_model()
    assert step2.policy.sacpo_frozen_adapters == ["link0"]
    reference = step2.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert (reference - trained).abs().max().item() <= 1e-5
    # at initialisation the new adapter is zero, so policy == reference and the DPO loss is log 2
    loss, _ = step2.compute_loss(batch)
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)

    if finetune == "qlora":
        # near-miss: the merged copy as a QLoRA base (what a merged hand-off does) is not the trained policy
        (out / CHAIN_FILE).rename(out / "hidden_chain.json")
        merged_base = SafetyDPO(policy=_settings(str(out), "qlora"), beta=0.1, lam=2.0)
        merged_base.configure_model()
        (out / "hidden_chain.json").rename(out / CHAIN_FILE)
        lossy = merged_base.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert (lossy - trained).abs().max().item() > 1e-3


def test_step2_trains_only_its_own_adapter(tiny_model_dir, tmp_path):
    _, out = _step1(tiny_model_dir, tmp_path, "lora")
    step2 = SafetyDPO(policy=_settings(str(out), "lora"), beta=0.1, lam=2.0)
    step2.configure_model()
    trainable = {n for n, p in step2.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in step2.policy.named_parameters() if ".link0." in n}
    batch = make_pair_batch(seed=3)
    before = step2.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    _train(step2, batch, steps=3)
    for name, value in frozen_before.items():
        assert torch.equal(dict(step2.policy.named_parameters())[name], value), name
    after = step2.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    policy = step2.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert (policy - after).abs().max() > 1e-3  # step 2 moved away from its reference


def test_step2_export_is_the_whole_chain(tiny_model_dir, tmp_path):
    """The step-2 export lists SFT base, step-1 adapter and step-2 adapter, copied inside it, and loads (merged) to the
    policy trained in step 2."""
    _, out1 = _step1(tiny_model_dir, tmp_path, "lora")
    step2 = SafetyDPO(policy=_settings(str(out1), "lora"), optim=OptimSettings(lr=2e-2), beta=0.1, lam=2.0)
    step2.configure_model()
    batch = make_pair_batch(seed=4)
    _train(step2, batch, steps=3)
    step2.policy.eval()
    out2 = tmp_path / "step2"
    step2.export_pretrained(str(out2))
    chain = read_chain(out2)
    assert chain.base == tiny_model_dir
    assert [link.path.relative_to(out2.resolve()).as_posix() for link in chain.links] == ["chain/0", "adapter"]
    assert not (out2 / "model.safetensors").exists()
    expected = step2.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    got = _logps(step2, load_causal_lm(str(out2)), batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_adapter_merge_equals_weight_merge(tiny_model_dir, tmp_path):
    """P-SACPO on adapter exports writes scaled adapters; loaded, it equals the weight-space merge of the merged
    exports, and q = 0 / q = 1 give exactly step 1 / step 2."""
    step1, out1 = _step1(tiny_model_dir, tmp_path, "lora", merged=True)
    step2 = SafetyDPO(policy=_settings(str(out1), "lora"), optim=OptimSettings(lr=2e-2), beta=0.1, lam=2.0)
    step2.configure_model()
    _train(step2, make_pair_batch(seed=5), steps=3)
    out2 = tmp_path / "step2"
    step2.export_pretrained(str(out2), merged=True)
    batch = make_pair_batch(seed=6)

    # adapter-only copies of both exports (the merged weights hidden), to merge as chains; plain copies (the chain
    # file and adapters removed, only the merged weights left) for the weight-space side, so that it never goes
    # through the chain code it checks
    chains, plain = [], []
    for src in (out1, out2):
        chain_dst, plain_dst = tmp_path / f"{src.name}_chain", tmp_path / f"{src.name}_plain"
        shutil.copytree(src, chain_dst)
        (chain_dst / "model.safetensors").unlink()
        chains.append(chain_dst)
        shutil.copytree(src, plain_dst)
        (plain_dst / CHAIN_FILE).unlink()
        for folder in ("adapter", "chain"):
            if (plain_dst / folder).exists():
                shutil.rmtree(plain_dst / folder)
        assert read_chain(plain_dst) is None
        plain.append(plain_dst)
    qs = [0.0, 0.3, 1.0]
    adapter_merges = merge_model_folders(chains[0], chains[1], qs, output_root=tmp_path / "adapter_merges")
    weight_merges = merge_model_folders(plain[0], plain[1], qs, output_root=tmp_path / "weight_merges")
    for q, a_dir, w_dir in zip(qs, adapter_merges, weight_merges, strict=True):
        meta = json.loads((a_dir / "sacpo_merge.json").read_text())
        assert meta["kind"] == "adapter_merge" and not (a_dir / "model.safetensors").exists()
        assert read_chain(w_dir) is None and (w_dir / "model.safetensors").is_file()
        scales = sorted(link.scale for link in read_chain(a_dir).links)
        assert scales == ([1.0] if q == 0.0 else [q, 1.0] if q < 1 else [1.0, 1.0])
        torch.testing.assert_close(_logps(step1, load_causal_lm(str(a_dir)), batch),
                                   _logps(step1, load_causal_lm(str(w_dir)), batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logps(step1, load_causal_lm(str(adapter_merges[0])), batch),
                               _logps(step1, load_causal_lm(str(chains[0])), batch), atol=0, rtol=0)
    torch.testing.assert_close(_logps(step1, load_causal_lm(str(adapter_merges[2])), batch),
                               _logps(step1, load_causal_lm(str(chains[1])), batch), atol=1e-6, rtol=1e-6)


def test_reference_checks(tiny_model_dir, tmp_path):
    """Step 2 stops when its base is not a step-1 export or was trained with another beta; ``any`` overrides."""
    _, out = _step1(tiny_model_dir, tmp_path, "lora", beta=0.1)
    with pytest.raises(ValueError, match="expected_reference.*reward_dpo or reward_kto"):
        SafetyDPO(policy=_settings(tiny_model_dir, "lora")).check_reference(tiny_model_dir)
    with pytest.raises(ValueError, match="--model.beta = 0.2 differs from the beta 0.1"):
        SafetyDPO(policy=_settings(str(out), "lora"), beta=0.2).check_reference(str(out))
    assert "reward_dpo" in SafetyDPO(policy=_settings(str(out), "lora"), beta=0.1).check_reference(str(out))
    assert "unchecked" in SafetyDPO(beta=0.2, expected_reference="any").check_reference(tiny_model_dir)
    assert "SFT" in SafetyDPO(expected_reference="sft").check_reference(tiny_model_dir)
    with pytest.raises(ValueError, match="is the export of a reward_dpo step"):
        SafetyDPO(expected_reference="sft").check_reference(str(out))
    # step 1 from SFT passes; step 1 from an aligned model stops unless it is the swapped order's safety step
    assert "SFT" in RewardDPO().check_reference(tiny_model_dir)
    with pytest.raises(ValueError, match="reward_dpo step"):
        RewardDPO().check_reference(str(out))
    with pytest.raises(ValueError, match="safety_dpo or safety_kto"):
        RewardDPO(expected_reference="safety_step").check_reference(str(out))


def test_reference_is_computed_in_eval_mode_and_dropout_is_an_option(tiny_model_dir, tmp_path):
    """With dropout in the base model, the live reference (eval mode) is deterministic and equals the reference
    cache's numbers; ``disable_dropout`` (default) zeroes the base model's dropout."""
    from transformers import AutoConfig

    from sacpo_lightning.models.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny_dropout")
    config = AutoConfig.from_pretrained(folder)
    config.attention_dropout = 0.5
    config.save_pretrained(folder)
    batch = make_pair_batch(seed=7)
    kept = SafetyDPO(policy=PolicySettings(name_or_path=str(folder), lora=LoraSettings(r=4, alpha=8),
                                           disable_dropout=False), expected_reference="any")
    kept.configure_model()
    kept.policy.train()
    torch.manual_seed(0)
    first = kept.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    second = kept.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert kept.policy.training  # the training mode is restored
    kept.policy.eval()
    torch.testing.assert_close(kept.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"]),
                               first, atol=0, rtol=0)
    kept.policy.train()
    noisy = [kept.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"]) for _ in range(2)]
    assert (noisy[0] - noisy[1]).abs().max() > 1e-4  # dropout kept: the policy's own pass is noisy

    off = SafetyDPO(policy=PolicySettings(name_or_path=str(folder), lora=LoraSettings(r=4, alpha=8)),
                    expected_reference="any")
    off.configure_model()
    off.policy.train()
    quiet = [off.policy_logps(batch["input_ids"], batch["attention_mask"], batch["labels"]) for _ in range(2)]
    torch.testing.assert_close(quiet[0], quiet[1], atol=0, rtol=0)


def test_reference_cache_identifies_a_chain_by_its_adapters(tmp_path):
    """Two chain folders alike at the top level but with different adapter weights are different references."""
    import os

    from sacpo_lightning.models.chain import write_chain_file
    from sacpo_lightning.refcache import model_fingerprint

    prints = []
    for i, payload in enumerate((b"weights-a", b"weights-b")):
        folder = tmp_path / f"export{i}"
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(payload)
        write_chain_file(folder, "tiny-random-llama", [{"path": "adapter", "scale": 1.0}], gguf_file=None,
                         revision=None, dtype="float32")
        for entry in folder.iterdir():
            os.utime(entry, ns=(0, 0))  # same sizes and times at the top level
        fp = model_fingerprint(PolicySettings(name_or_path=str(folder)))
        prints.append({k: v for k, v in fp.items() if k != "path"})
    assert prints[0]["files"] == prints[1]["files"]
    assert prints[0] != prints[1]


def test_frozen_links_have_no_dropout(tiny_model_dir, tmp_path):
    """With ``lora_dropout`` 0.5 in both steps, step 2 at initialisation in train mode is exactly its reference: the
    frozen step-1 adapter's dropout is the identity (only the trained adapter keeps its own), so two policy passes
    agree and the DPO loss is log 2."""
    lora = LoraSettings(r=4, alpha=8, dropout=0.5)
    step1 = RewardDPO(policy=PolicySettings(name_or_path=tiny_model_dir, lora=lora), optim=OptimSettings(lr=2e-2))
    step1.configure_model()
    _train(step1, make_pair_batch(seed=1), steps=4)
    out = tmp_path / "step1_dropout"
    step1.export_pretrained(str(out), merged=False)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.5

    step2 = SafetyDPO(policy=PolicySettings(name_or_path=str(out), lora=lora), beta=0.1, lam=2.0)
    step2.configure_model()
    step2.policy.train()
    batch = make_pair_batch(seed=2)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    torch.manual_seed(0)
    first, second = step2.policy_logps(*args).detach(), step2.policy_logps(*args).detach()
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, step2.reference_logps(*args), atol=1e-6, rtol=1e-6)
    loss, _ = step2.compute_loss(batch)
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)
