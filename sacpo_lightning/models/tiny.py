"""A tiny random Llama and a byte-level tokenizer, built in memory, for tests and debugging runs.

The tokenizer adds a BOS token (like Llama's), has no pad token (so pad handling is exercised), and carries a chat
template, which makes it a faithful stand-in for real tokenizers while the whole model trains in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Returns a deterministic byte-level tokenizer (256 byte tokens + specials) that prepends ``<s>``."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
    return fast


def build_tiny_llama(seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2) -> LlamaForCausalLM:
    """Returns a randomly initialised 2-layer Llama (hidden 64, vocab 512) with a fixed seed."""
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(torch.float32)


def save_tiny_model(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the tiny model and tokenizer as a Hugging Face folder (safetensors) and returns its path."""
    from sacpo_lightning.io import atomic_directory

    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        build_tiny_llama(seed).save_pretrained(tmp, safe_serialization=True)
        build_tiny_tokenizer().save_pretrained(tmp)
    return output_dir
