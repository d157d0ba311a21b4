"""QLoRA (and LoRA) DPO steps on one GPU with a 1B-class random-weight Llama: tokens/s and peak GPU memory.

Runs the product's own path (``RewardDPO`` under a Lightning ``Trainer``, bf16-mixed, QLoRA NF4 with double
quantization, gradient checkpointing), then exports the trained adapter merged into the base. Prints one JSON line per
configuration and, last, a summary line with a 7B estimate (memory scaled by parameter count for weights, measured
activation memory carried over; throughput scaled by the ratio of parameter counts).

    python benchmarks/gpu_qlora_step.py --steps 10 --seq-len 512 --pairs 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_random_llama(path: Path, *, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo_lightning.models.tiny import build_tiny_tokenizer

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n_params


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, prompt_len: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(10, vocab, (n, 2, seq_len), generator=g)
        self.ids[:, 1, :prompt_len] = self.ids[:, 0, :prompt_len]
        self.prompt_len = prompt_len

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return i

    def collate(self, indices: list[int]) -> dict:
        ids = torch.cat([self.ids[indices, 0], self.ids[indices, 1]])
        labels = ids.clone()
        labels[:, : self.prompt_len] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "index": torch.tensor(indices)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(model_dir: Path, finetune: str, args, n_params: int, export: bool) -> dict:
    import lightning as L

    from sacpo_lightning.models.policy import LoraSettings, PolicySettings
    from sacpo_lightning.modules import OptimSettings, RewardDPO

    class Timer(L.Callback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            self.times.append(time.perf_counter() - self._t)
            self.losses.append(float(outputs["loss"]))

    policy = PolicySettings(
        name_or_path=str(model_dir), finetune=finetune, dtype="bfloat16", gradient_checkpointing=True,
        lora=LoraSettings(r=16, alpha=32, target_modules="all-linear"),
    )
    module = RewardDPO(policy=policy, optim=OptimSettings(lr=1e-4, optimizer=args.optimizer, warmup_ratio=0.0),
                       beta=0.1)
    data = RandomPairs(args.pairs * (args.steps + args.warmup), args.seq_len, args.vocab, args.seq_len // 2)
    loader = torch.utils.data.DataLoader(data, batch_size=args.pairs, collate_fn=data.collate)
    timer = Timer()
    timer.losses = []
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=args.steps + args.warmup, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, loader)
    import resource

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else rss_gib
    measured = timer.times[args.warmup:]
    per_step = sum(measured) / len(measured)
    tokens = 2 * args.pairs * args.seq_len
    result = {
        "finetune": finetune, "params": n_params, "seq_len": args.seq_len, "pairs_per_step": args.pairs,
        "s_per_step": round(per_step, 4), "tokens_per_s": round(tokens / per_step, 1),
        "pairs_per_s": round(args.pairs / per_step, 2), "peak_gpu_mem_gib": round(peak, 2),
        "loss_first": round(timer.losses[0], 5), "loss_last": round(timer.losses[-1], 5),
        "device": torch.cuda.get_device_name() if gpu else "cpu (peak = process RSS)",
    }
    if export:
        out = Path(tempfile.mkdtemp()) / "export"
        t = time.perf_counter()
        module.export_pretrained(str(out))
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        result["export_s"] = round(time.perf_counter() - t, 1)
        result["export_loadable"] = reloaded.config.num_hidden_layers == module.policy.config.num_hidden_layers
    del trainer, module
    if gpu:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--optimizer", default="paged_adamw_8bit")
    parser.add_argument("--modes", nargs="+", default=["qlora", "lora"])
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = Path(tempfile.mkdtemp()) / "llama-1b-random"
    t = time.perf_counter()
    n_params = build_random_llama(model_dir, layers=args.layers, hidden=args.hidden,
                                  intermediate=args.intermediate, vocab=args.vocab)
    print(json.dumps({"built_model_s": round(time.perf_counter() - t, 1), "params": n_params}), flush=True)
    results = []
    for i, mode in enumerate(args.modes):
        results.append(run(model_dir, mode, args, n_params, export=(i == 0)))
        print(json.dumps(results[-1]), flush=True)
    qlora = next(r for r in results if r["finetune"] == "qlora")
    scale = 6.74e9 / n_params
    # NF4 weights with double quantization take ~0.53 bytes/parameter; activations grow with hidden size and layers.
    weights_1b = n_params * 0.53 / 2**30
    estimate = {
        "estimate_7b_qlora_tokens_per_s": round(qlora["tokens_per_s"] / scale, 1),
        "estimate_7b_qlora_peak_gpu_mem_gib": round(weights_1b * scale + (qlora["peak_gpu_mem_gib"] - weights_1b)
                                                    * (4096 * 32) / (args.hidden * args.layers), 1),
        "basis": f"1B-class measurement scaled by 6.74e9/{n_params} parameters; activations by hidden*layers",
    }
    print(json.dumps({"summary": results, **estimate}), flush=True)


if __name__ == "__main__":
    main()
