"""float32 vs bf16 autocast on this CPU: one forward + backward of a LoRA policy on 8 x 128 tokens.

Prints the native-bf16 instruction sets the CPU reports and the seconds per pass in each precision; this is what
``precision: auto`` decides on (bf16 only where it is native).

    python benchmarks/bench_precision.py [--model smollm2] [--batch 8] [--length 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from sacpo_lightning.models.policy import PolicySettings, build_policy
from sacpo_lightning.precision import cpu_bf16_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_policy(PolicySettings(name_or_path=args.model, finetune="lora"))
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.length))

    def step() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float().sum().backward()

    print("cpu native bf16 flags:", ", ".join(cpu_bf16_flags()) or "none")
    for name, ctx in (("float32", torch.autocast("cpu", enabled=False)),
                      ("bf16 autocast", torch.autocast("cpu", dtype=torch.bfloat16))):
        with ctx:
            step()  # warm-up
            start = time.perf_counter()
            step()
            print(f"{name}: {time.perf_counter() - start:.2f} s per forward+backward")


if __name__ == "__main__":
    main()
