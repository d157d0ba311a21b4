"""Throughput, memory and MFU of sacpo-lightning's DPO/KTO steps, with and without the reference cache, and (for
DPO) TRL's DPOTrainer on identical work.

Run from the project root (the last line printed is one JSON object):

    python benchmarks/bench_dpo.py --model smollm2 --steps 8 --warmup-steps 2
    python benchmarks/bench_dpo.py --model smollm2 --steps 8 --warmup-steps 2 --compare trl

See benchmarks/README.md for what each figure means and how FLOPs are counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh_rlhf", "helpful.train.jsonl")
TRL_MISSING = (
    "--compare trl needs TRL in this environment (pip install 'trl==1.16.0', the project's `bench` extra); "
    "this script installs nothing itself."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="named model (smollm2, tiny-random-llama) or HF folder/id")
    p.add_argument("--data", default=DEFAULT_DATA, help="preference file (.jsonl/.json/.parquet)")
    p.add_argument("--source", default=None, choices=["pku", "hh", "generic", "kto"],
                   help="row format; default from the file name (hh_rlhf -> hh, pku -> pku, else generic)")
    p.add_argument("--algo", default="dpo", choices=["dpo", "kto"])
    p.add_argument("--seq-len", type=int, default=256, help="max tokens of prompt + response (prompt <= half)")
    p.add_argument("--pairs-per-step", type=int, default=4, help="pairs (DPO) or unpaired examples (KTO) per step")
    p.add_argument("--finetune", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, all-linear, no dropout)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--matmul-size", type=int, default=2048, help="size n of the n x n x n matmul timed for MFU")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                   help="attention of both stacks (the project's default is sdpa; see README, Performance)")
    p.add_argument("--share-prompt", default="on", choices=["on", "off"],
                   help="our DPO step scores each pair with its prompt once (policy.share_prompt, the default) or "
                        "in two rows that both hold it, as TRL does")
    p.add_argument("--tune-malloc", default="none", choices=["ours", "both", "none"],
                   help="fix glibc's mmap threshold at 128 KiB (sacpo_lightning.allocator, opt-in for the sacpo "
                        "command) in our process, in both stacks' processes, or in neither (default)")
    p.add_argument("--compare", default=None, choices=["trl"], help="also run TRL on the same work (subprocess)")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("seq_len", "pairs_per_step", "lora_r", "steps", "matmul_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if args.source is None:
        name = os.path.abspath(args.data).lower()
        args.source = "hh" if "hh_rlhf" in name else ("pku" if "pku" in name else "generic")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> dict[str, float]:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def autocast(args: argparse.Namespace):
    if args.precision == "bf16":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def matmul_rate(args: argparse.Namespace) -> float:
    """FLOP/s of an n x n x n matmul in the benchmark's precision on its device (best of 5)."""
    n = args.matmul_size
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    best = float("inf")
    for i in range(6):
        sync(args.device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(args.device)
        if i > 0:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def load_examples(args: argparse.Namespace, model_path: str) -> tuple[list[dict[str, Any]], Any]:
    """The tokenized examples (in order) and the collate function, via the project's DataModule."""
    import functools

    from sacpo_lightning.data import PreferenceDataModule, collate_kto, collate_pairs

    kind = "kto" if args.algo == "kto" else "pairs"
    needed = (args.warmup_steps + args.steps) * args.pairs_per_step
    pku = args.source == "pku"  # PKU pairs by safety (its helpfulness labels may be absent), KTO from its flags
    dm = PreferenceDataModule(
        [args.data], source=args.source, kind=kind, kto_from="flags" if pku else "pairs",
        objective="safe" if pku else "helpful", tokenizer=model_path, template="chat", max_length=args.seq_len,
        max_prompt_length=max(1, args.seq_len // 2), val_fraction=0.0, max_samples=needed,
        batch_size=args.pairs_per_step, seed=args.seed, on_invalid="skip",
    )
    dm.setup("fit")
    examples = dm.train_dataset.examples
    if len(examples) < needed:
        raise SystemExit(f"{args.data} gave {len(examples)} examples; {needed} are needed for "
                         f"{args.warmup_steps}+{args.steps} steps of {args.pairs_per_step}.")
    if kind == "kto":
        collate = functools.partial(collate_kto, pad_token_id=dm.pad_token_id, max_length=args.seq_len)
    else:
        collate = functools.partial(collate_pairs, pad_token_id=dm.pad_token_id)
    return examples, collate


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) multiply-accumulates per token of the model's linear layers (LM head and LoRA included)."""
    total = trainable = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            macs = m.in_features * m.out_features
            total += macs
            if m.weight.requires_grad:
                trainable += macs
    return total, trainable


def real_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(trained-row tokens, KTO KL-row tokens) of a batch, padding excluded."""
    kl = int(batch["kl_attention_mask"].sum()) if "kl_attention_mask" in batch else 0
    return int(batch["attention_mask"].sum()), kl


def shared_prompt_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Prompt tokens a pass with each pair's prompt held once does not repeat (the rejected rows' prompts)."""
    from sacpo_lightning.logprobs import _shared_prompt_lengths

    prompt = _shared_prompt_lengths(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return 0 if prompt is None else int(prompt.sum())


# ------------------------------------------------------------------------------------------------ our stack
def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from sacpo_lightning.models import resolve_model_path
    from sacpo_lightning.models.policy import LoraSettings, PolicySettings
    from sacpo_lightning.modules import OptimSettings, RewardDPO, RewardKTO
    from sacpo_lightning.refcache import batch_reference_logps, compute_reference_logps

    torch.manual_seed(args.seed)
    model_path = resolve_model_path(args.model)
    examples, collate = load_examples(args, model_path)
    b = args.pairs_per_step
    batches = [collate(examples[i * b : (i + 1) * b]) for i in range(args.warmup_steps + args.steps)]
    # Frozen base weights in bf16 for adapters; full fine-tuning keeps float32 master weights under autocast.
    dtype = "bfloat16" if args.precision == "bf16" and args.finetune != "full" else "float32"
    policy = PolicySettings(name_or_path=model_path, finetune=args.finetune, dtype=dtype,
                            attn_implementation=args.attn_implementation, share_prompt=args.share_prompt == "on",
                            lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0))
    optim = OptimSettings(lr=args.lr, warmup_ratio=0.0)
    if args.algo == "kto":
        module = RewardKTO(policy=policy, optim=optim, beta=args.beta, auto_class_weights=False)
    else:
        module = RewardDPO(policy=policy, optim=optim, beta=args.beta)
    module.configure_model()
    module.to(args.device)
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    n_all, n_trainable = matmul_params(module.policy)
    kind = "kto" if args.algo == "kto" else "pairs"

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(args.device) for k, v in batch.items()}

    def epoch(steps: list[dict[str, torch.Tensor]]) -> tuple[float, list[float]]:
        elapsed, losses = 0.0, []
        for batch in steps:
            sync(args.device)
            start = time.perf_counter()
            with autocast(args):
                loss, _ = module.compute_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(args.device)
            elapsed += time.perf_counter() - start
            losses.append(loss.detach().item())
        return elapsed, losses

    device_batches = [to_device(x) for x in batches]
    epoch(device_batches[: args.warmup_steps])
    timed = device_batches[args.warmup_steps :]
    uncached_s, losses = epoch(timed)

    # The cache: reference log-probs of the timed examples, computed once, then injected as ReferenceCache does.
    timed_indices = list(range(args.warmup_steps * b, (args.warmup_steps + args.steps) * b))
    module.eval()
    sync(args.device)
    start = time.perf_counter()
    with autocast(args):
        columns, _ = compute_reference_logps(module.reference_logps, examples, collate, kind, batch_size=b,
                                             device=args.device, indices=timed_indices)
    sync(args.device)
    cache_build_s = time.perf_counter() - start
    module.train()
    columns = {k: v.to(args.device) for k, v in columns.items()}
    cached_batches = [{**x, **batch_reference_logps(x, columns, kind)} for x in timed]
    cached_s, cached_losses = epoch(cached_batches)

    tokens = kl_tokens = repeated = 0
    for batch in batches[args.warmup_steps :]:
        t, k = real_tokens(batch)
        tokens, kl_tokens = tokens + t, kl_tokens + k
        if args.algo == "dpo" and args.share_prompt == "on":
            repeated += shared_prompt_tokens(batch)
    # FLOPs are counted on the tokens the passes hold: with shared prompts, each pair's prompt once.
    processed = tokens - repeated
    # Model FLOPs (see README): policy forward 2N, backward 2N (activation grads) + 2N_trainable (weight grads),
    # live reference forward 2N; KTO's KL rows: policy forward 2N (+ reference 2N when live).
    train_flops = processed * (4 * n_all + 2 * n_trainable) + kl_tokens * 2 * n_all
    ref_flops = (processed + kl_tokens) * 2 * n_all
    peak = matmul_rate(args)
    n_ex = args.steps * b
    result = {
        "stack": "sacpo-lightning",
        "examples": n_ex,
        "tokens": tokens + kl_tokens,
        "tokens_processed": processed + kl_tokens,
        "share_prompt": args.share_prompt == "on" and args.algo == "dpo",
        "pairs_per_s": n_ex / uncached_s,
        "tokens_per_s": (tokens + kl_tokens) / uncached_s,
        "pairs_per_s_cached": n_ex / cached_s,
        "tokens_per_s_cached": (tokens + kl_tokens) / cached_s,
        "epoch_uncached_s": uncached_s,
        "epoch_cached_s": cached_s,
        "cache_build_s": cache_build_s,
        "cached_speedup": uncached_s / cached_s,
        # the reference cache's forward-only pass per example, relative to a cached training step per example
        "cache_to_step_ratio": cache_build_s / cached_s,
        "model_flops_per_s": (train_flops + ref_flops) / uncached_s,
        "model_flops_per_s_cached": train_flops / cached_s,
        "matmul_flops_per_s": peak,
        "mfu": (train_flops + ref_flops) / uncached_s / peak,
        "mfu_cached": train_flops / cached_s / peak,
        "params_matmul": n_all,
        "params_trainable_matmul": n_trainable,
        "loss_first": losses[0],
        "loss_last_cached": cached_losses[-1],
        **peak_memory(args.device),
    }
    if not all(math.isfinite(x) for x in losses + cached_losses):
        raise SystemExit(f"non-finite losses: {losses} {cached_losses}")
    return result


# ---------------------------------------------------------------------------------------------------- TRL
def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's DPOTrainer on the same token rows, order, batch, LoRA, precision, optimizer and steps."""
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(TRL_MISSING)
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from sacpo_lightning.models import load_tokenizer, resolve_model_path

    torch.manual_seed(args.seed)
    model_path = resolve_model_path(args.model)
    examples, collate = load_examples(args, model_path)
    b = args.pairs_per_step
    total = args.warmup_steps + args.steps
    rows = [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples[: total * b]]
    tokens = sum(real_tokens(collate(examples[i * b : (i + 1) * b]))[0] for i in range(args.warmup_steps, total))
    dtype = torch.bfloat16 if args.precision == "bf16" and args.finetune != "full" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=args.attn_implementation)
    model.config.use_cache = False
    peft_config = None
    if args.finetune != "full":
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", bias="none", task_type="CAUSAL_LM")

    class SameWorkDPOTrainer(DPOTrainer):
        """Takes the already tokenized rows as they are, and keeps their order."""

        def _prepare_dataset(self, dataset, *unused, **kwargs):
            return dataset

        def _get_train_sampler(self, *unused, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *unused, **kwargs):
            sync(args.device)
            self.start = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            sync(args.device)
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=b, max_steps=total, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
            bf16=args.precision == "bf16", gradient_checkpointing=False, beta=args.beta, max_length=args.seq_len,
            pad_to_multiple_of=None, save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True,
            use_cpu=args.device == "cpu", seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False,
        )
        trainer = SameWorkDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                     processing_class=load_tokenizer(model_path), peft_config=peft_config,
                                     callbacks=[timer])
        trainer.train()
    elapsed = sum(timer.times[args.warmup_steps :])
    n_ex = args.steps * b
    return {"stack": "trl", "trl_version": importlib.import_module("trl").__version__, "examples": n_ex,
            "tokens": tokens, "pairs_per_s": n_ex / elapsed, "tokens_per_s": tokens / elapsed, "epoch_s": elapsed,
            **peak_memory(args.device)}


def compare_trl(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Runs :func:`run_trl` in a child process (its own peak memory) and returns its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--trl-worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise SystemExit(f"the TRL run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = {"algo": args.algo, "model": args.model, "finetune": args.finetune, "lora_r": args.lora_r,
                "precision": args.precision, "device": args.device, "seq_len": args.seq_len,
                "pairs_per_step": args.pairs_per_step, "steps": args.steps, "warmup_steps": args.warmup_steps,
                "attn_implementation": args.attn_implementation, "threads": torch.get_num_threads()}
    load_start = os.getloadavg()[0]
    from sacpo_lightning.allocator import DEFAULT_MMAP_THRESHOLD, ENV, tune_malloc

    tuned = args.tune_malloc == "both" or (args.tune_malloc == "ours" and not args.trl_worker)
    settings["malloc_mmap_threshold"] = tune_malloc({ENV: str(DEFAULT_MMAP_THRESHOLD)}) if tuned else None
    if args.trl_worker:
        print(json.dumps({**settings, **run_trl(args), "loadavg_1min": [load_start, os.getloadavg()[0]]}), flush=True)
        return 0
    if args.compare == "trl":
        if args.algo != "dpo":
            raise SystemExit("--compare trl runs TRL's DPOTrainer and supports --algo dpo only.")
        if importlib.util.find_spec("trl") is None:
            raise SystemExit(TRL_MISSING)
    result = {**settings, **run_ours(args), "loadavg_1min": [load_start, os.getloadavg()[0]]}
    if args.compare == "trl":
        child = [a for a in argv if a not in ("--compare", "trl") and not a.startswith("--compare=")]
        trl = compare_trl(args, child)
        result["trl"] = trl
        result["trl_throughput_ratio"] = result["pairs_per_s"] / trl["pairs_per_s"]
        result["trl_throughput_ratio_cached"] = result["pairs_per_s_cached"] / trl["pairs_per_s"]
        result["trl_memory_ratio"] = result["peak_rss_mb"] / trl["peak_rss_mb"]
        if "peak_gpu_mb" in result and "peak_gpu_mb" in trl:
            result["trl_gpu_memory_ratio"] = result["peak_gpu_mb"] / trl["peak_gpu_mb"]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
