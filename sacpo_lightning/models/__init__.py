"""Model loading: named local models, tokenizers, LoRA/QLoRA policies and exports."""

from sacpo_lightning.models.registry import cache_dir, prepare_named_model, resolve_model_path
from sacpo_lightning.models.tokenizer import load_tokenizer

__all__ = ["cache_dir", "load_tokenizer", "prepare_named_model", "resolve_model_path"]
