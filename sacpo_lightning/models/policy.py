"""Building the trainable policy: full fine-tuning, LoRA, or QLoRA (4-bit NF4 base + LoRA)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoModelForCausalLM, PreTrainedModel

from sacpo_lightning.errors import MissingFileError, UserError, require_extra
from sacpo_lightning.models.chain import (
    TRAINABLE_ADAPTER,
    activate,
    attach_frozen_links,
    has_full_weights,
    merge_links,
    read_chain,
)
from sacpo_lightning.models.classifier import load_sequence_classifier
from sacpo_lightning.models.registry import NAMED_MODELS, model_files, resolve_model_path
from sacpo_lightning.precision import DTYPES, DtypeName, resolve_dtype

FinetuneMode = Literal["full", "lora", "qlora"]


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft ``LoraConfig``).

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``"all-linear"`` for every linear layer but the output head.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise UserError(f"--model.lora.r must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"--model.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--model.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class PolicySettings:
    """What to load and how to train it.

    Args:
        name_or_path: Hub id, local Hugging Face folder, or a named local model (``smollm2``, ``tiny-random-llama``).
        finetune: ``full`` (all weights; the reference is a frozen copy), ``lora`` or ``qlora`` (the reference is the
            same network with the adapter disabled).
        dtype: Dtype the base weights are loaded in. LoRA adapter weights always train in float32.
        gguf_file: GGUF file inside ``name_or_path`` to load (de-quantized).
        trust_remote_code: Run modelling code shipped with the checkpoint. Off unless turned on.
        revision: Hub revision.
        gradient_checkpointing: Trade compute for activation memory.
        attn_implementation: Passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``).
        lora: Adapter settings for ``lora``/``qlora``.
        qlora_compute_dtype: Compute dtype of the 4-bit layers. ``auto`` (for this and ``dtype``) is ``bfloat16`` where
            bf16 is native (a GPU with bf16, a CPU with AVX512_BF16/AMX) and ``float32`` elsewhere, resolved when the
            settings are built.
        qlora_double_quant: Quantize the quantization constants too (saves ~0.4 bit per weight).
        disable_dropout: Set every dropout probability of the base model to 0 (the adapter's own dropout is
            ``lora.dropout``). With dropout on, the policy's log-probs in training are noisy while the reference's
            (always computed in eval mode) are not, so the implicit reward at initialisation is not exactly 0.
        share_prompt: Score a preference pair in one sequence that holds its prompt once (prompt, chosen, rejected,
            with a mask that keeps the two responses apart; :func:`~sacpo_lightning.logprobs.pair_sequence_logps`)
            instead of two rows that both hold it: the same log-probs up to float rounding with fewer tokens per pass.
            Packed under eager attention at any precision and SDPA in float32; SDPA under bf16/fp16, flash
            attention and sliding-window models use two rows.
    """

    name_or_path: str = "tiny-random-llama"
    finetune: FinetuneMode = "lora"
    dtype: DtypeName | Literal["auto"] = "float32"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = "sdpa"
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora_compute_dtype: DtypeName | Literal["auto"] = "bfloat16"
    qlora_double_quant: bool = True
    disable_dropout: bool = True
    share_prompt: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.finetune not in ("full", "lora", "qlora"):
            raise UserError(f"--model.policy.finetune must be one of full, lora, qlora; got {self.finetune!r}")
        self.dtype = resolve_dtype(self.dtype)
        self.qlora_compute_dtype = resolve_dtype(self.qlora_compute_dtype)
        if self.qlora_compute_dtype not in DTYPES:
            raise UserError(f"--model.policy.qlora_compute_dtype must be one of {', '.join(DTYPES)} or auto; "
                            f"got {self.qlora_compute_dtype!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--model.policy.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")

    @property
    def uses_adapter(self) -> bool:
        return self.finetune in ("lora", "qlora")


def check_model_source(name_or_path: str, option: str | None = "--model.policy.name_or_path") -> None:
    """Fails early, naming ``option``, when ``name_or_path`` looks like a local folder that does not exist.

    A value looks local when it starts with ``.``, ``/``, ``~`` or ``$``, has more than one ``/`` (a Hub id has one),
    contains the platform's path separator other than ``/``, or begins with an existing folder (``outputs/run``).
    Hub ids and named local models pass. For SACPO's step 2 this catches a reference (the step-1 export) that was
    never written, before anything is loaded.
    """
    if name_or_path in NAMED_MODELS:
        return
    path = os.path.expanduser(os.path.expandvars(name_or_path))
    seps = {os.sep, os.altsep} - {None, "/"}
    looks_local = (
        name_or_path.startswith((".", "/", "~", "$"))
        or name_or_path.count("/") > 1
        or any(sep in name_or_path for sep in seps)
        or ("/" in name_or_path and os.path.isdir(name_or_path.split("/", 1)[0]))
    )
    what = f"{option} = {name_or_path!r}" if option else f"Model {name_or_path!r}"
    if looks_local and not os.path.exists(path):
        raise MissingFileError(
            f"{what}: model folder {os.path.abspath(path)} does not exist. For a SACPO step-2 run this is the step-1 "
            "export (<step-1 default_root_dir>/export): run step 1 first or correct the path."
        )
    markers = ("config.json", "adapter_config.json", "sacpo_chain.json")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, m)) for m in markers):
        if not any(name.endswith(".gguf") for name in os.listdir(path)):
            raise MissingFileError(
                f"{what}: folder {os.path.abspath(path)} holds no Hugging Face model (no config.json); point it at "
                "an exported model folder."
            )


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: DtypeName | Literal["auto"] = "float32",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = "sdpa",
    quantization_config=None,
    device_map=None,
) -> PreTrainedModel:
    """Loads a causal LM from a Hub id, a local folder, or a named local model.

    An adapter-only export (see :mod:`sacpo_lightning.models.chain`) loads as its base with the adapters merged into
    the weights; ``quantization_config`` is refused for it (merging into quantized weights is lossy: train through
    :func:`build_policy`, which keeps the adapters unmerged).
    """
    check_model_source(name_or_path, option=None)
    local = os.path.expanduser(os.path.expandvars(name_or_path))
    chain = read_chain(local) if os.path.isdir(local) and not has_full_weights(local) else None
    if chain is not None:
        if quantization_config is not None:
            raise UserError(f"{name_or_path} is an adapter chain; it cannot be loaded merged into quantized weights.")
        base = load_causal_lm(chain.base, dtype=dtype, gguf_file=chain.base_gguf_file,
                              trust_remote_code=trust_remote_code, revision=chain.base_revision,
                              attn_implementation=attn_implementation, device_map=device_map)
        return merge_links(base, chain.links)
    kwargs: dict = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        from transformers import GgufConfig

        kwargs["gguf_file"] = gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    with model_files(name_or_path):
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def load_model_folder(path: str, dtype: str | torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM from a folder, Hub id or named model in ``dtype`` (None: as saved): full weights, or an adapter
    export (base + adapters, merged on load in the export's dtype)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    local = os.path.expanduser(os.path.expandvars(str(path)))
    chain = read_chain(local) if os.path.isdir(local) and not has_full_weights(local) else None
    if chain is not None:
        return load_causal_lm(local, dtype=dtype if dtype not in (None, "auto") else (chain.dtype or "float32"))
    check_model_source(str(path), option=None)
    with model_files(str(path)):
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(str(path)),
                                                    dtype="auto" if dtype in (None, "auto") else DTYPES[dtype])


def bnb_4bit_config(settings: PolicySettings):
    """The bitsandbytes NF4 configuration of a QLoRA policy; a clear error when bitsandbytes is unusable."""
    require_extra("bitsandbytes", extra="qlora", feature="--model.policy.finetune=qlora",
                  alternative="Use finetune: lora instead.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=settings.qlora_double_quant,
        bnb_4bit_compute_dtype=DTYPES[settings.qlora_compute_dtype],
    )


def use_one_4bit_kernel(model: torch.nn.Module) -> int:
    """Makes every bitsandbytes 4-bit layer of ``model`` compute through the same kernel in training and inference.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs in eval mode without
    gradients, rounding its (double-quantized) scales to bfloat16: the reference pass of step 2 would then differ from
    the policy pass with the same weights by ~1e-3 nats per sequence, and a QLoRA reference would no longer be exactly
    the upstream policy. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def disable_dropout(model: torch.nn.Module) -> None:
    """Turns off every dropout of ``model`` in place: ``torch.nn.Dropout`` modules, and the float dropout rates that
    attention implementations read from their module (``attention_dropout``) and from the config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(config.to_dict().items()):
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, 0.0)


PolicyTask = Literal["causal_lm", "seq_cls"]
# The peft task type of each policy task: ``SEQ_CLS`` keeps the new score head trainable in full (modules_to_save).
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def lora_config(settings: PolicySettings, task: PolicyTask = "causal_lm"):
    from peft import LoraConfig

    lora = settings.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                      bias="none", task_type=PEFT_TASK_TYPES[task])


def load_score_backbone(
    settings: PolicySettings,
    *,
    dtype: DtypeName | None = None,
    num_labels: int = 1,
    pad_token_id: int | None = None,
    quantization_config=None,
    device_map=None,
    say_new_head: bool = True,
) -> PreTrainedModel:
    """A sequence classifier with ``num_labels`` outputs on the backbone of ``settings.name_or_path`` (a causal LM
    or a score model; a missing head is newly initialised, and said so unless ``say_new_head`` is ``False``; every
    backbone weight must load; see :func:`sacpo_lightning.models.classifier.load_sequence_classifier`)."""
    return load_sequence_classifier(
        settings.name_or_path,
        dtype=dtype or settings.dtype,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
        trust_remote_code=settings.trust_remote_code,
        revision=settings.revision,
        gguf_file=settings.gguf_file,
        attn_implementation=settings.attn_implementation,
        quantization_config=quantization_config,
        device_map=device_map,
        new_head=True,  # from a causal LM the head is new; backbone weights must still all load
        say_new_head=say_new_head,
    )


def _load_base_model(
    settings: PolicySettings,
    chain,
    *,
    device: torch.device | None,
    task: PolicyTask,
    num_labels: int,
    pad_token_id: int | None,
) -> PreTrainedModel:
    """The base network of :func:`build_policy`: the chain's base (or ``settings.name_or_path``) as a causal LM, or a
    sequence classifier for ``seq_cls``; quantized to 4-bit NF4 onto ``device`` (default: the CPU) for QLoRA."""
    quantization_config = None
    device_map = None
    if settings.finetune == "qlora":
        quantization_config = bnb_4bit_config(settings)
        device_map = {"": device if device is not None else torch.device("cpu")}
    if task == "seq_cls":
        return load_score_backbone(settings, num_labels=num_labels, pad_token_id=pad_token_id,
                                   quantization_config=quantization_config, device_map=device_map)
    return load_causal_lm(
        chain.base if chain else settings.name_or_path,
        dtype=settings.dtype,
        gguf_file=chain.base_gguf_file if chain else settings.gguf_file,
        trust_remote_code=settings.trust_remote_code,
        revision=chain.base_revision if chain else settings.revision,
        attn_implementation=settings.attn_implementation,
        quantization_config=quantization_config,
        device_map=device_map,
    )


def _prepare_full_finetuning(model: PreTrainedModel, settings: PolicySettings, chain) -> PreTrainedModel:
    """Full fine-tuning: the chain (if any) merged into the base weights, gradient checkpointing as configured."""
    if chain is not None:
        model = merge_links(model, chain.links)
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _prepare_adapter_training(model: PreTrainedModel, settings: PolicySettings) -> PreTrainedModel:
    """Readies the base for adapter training: k-bit preparation for QLoRA, else gradient checkpointing if asked."""
    from peft import prepare_model_for_kbit_training

    if settings.finetune == "qlora":
        import inspect

        # peft 0.22 renamed the keyword (the old name warns); older releases know only the old one
        accepted = inspect.signature(prepare_model_for_kbit_training).parameters
        kwargs_name = (
            "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in accepted
            else "gradient_checkpointing_kwargs"
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            **{kwargs_name: {"use_reentrant": False}},
        )
    elif settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _attach_fresh_adapter(model: PreTrainedModel, config):
    """A peft model with one new trainable adapter and no frozen ones."""
    from peft import get_peft_model

    model = get_peft_model(model, config)
    model.sacpo_frozen_adapters = []
    return model


def _add_trainable_adapter(peft_model, config, num_links: int):
    """Adds the trainable adapter on top of the ``num_links`` frozen chain adapters ``link0``, ``link1``, ..."""
    peft_model.add_adapter(TRAINABLE_ADAPTER, config)
    frozen = [f"link{i}" for i in range(num_links)]
    activate(peft_model, frozen, TRAINABLE_ADAPTER)
    peft_model.sacpo_frozen_adapters = frozen
    return peft_model


def _attach_adapters(model: PreTrainedModel, settings: PolicySettings, chain, config):
    """A fresh adapter (no chain), or the chain's adapters frozen with a new trainable one on top.

    Raises:
        ValueError: ``settings.lora.target_modules`` matches no module; the message lists the model's linear layers.
    """
    try:
        if chain is None:
            return _attach_fresh_adapter(model, config)
        model = attach_frozen_links(model, chain.links)
        return _add_trainable_adapter(model, config, len(chain.links))
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"--model.policy.lora.target_modules={settings.lora.target_modules!r} does not match modules of "
            f"{settings.name_or_path!r} ({err}). Linear layers of this model: {', '.join(names)}; or use 'all-linear'."
        ) from err


def _log_trainable(model, settings: PolicySettings, chain) -> None:
    """Logs how many parameters train (and on top of how many frozen adapters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = 100 * trainable / total
    on_top = f" on top of {len(chain.links)} frozen adapter(s)" if chain is not None else ""
    rank_zero_info(f"{settings.finetune}: {trainable:,} trainable of {total:,} parameters ({share:.2f}%){on_top}")


def build_policy(
    settings: PolicySettings,
    *,
    device: torch.device | None = None,
    task: PolicyTask = "causal_lm",
    num_labels: int = 1,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Loads the base model and applies LoRA or QLoRA as configured.

    QLoRA quantizes while loading onto ``device`` (4-bit layers quantize when they reach their device), so the full
    precision weights of a 7B model never need to fit on the accelerator.

    When ``name_or_path`` is an adapter-only export (SACPO's step 2 starting from step 1), its base is loaded (and
    quantized for QLoRA) and its adapters are attached frozen; a new adapter is trained on top. The frozen adapters'
    names are kept in ``model.sacpo_frozen_adapters`` so that the reference (:func:`chain.reference_adapters`) is
    exactly the upstream policy. Full fine-tuning merges the chain into the base weights instead.

    Args:
        settings: What to load and how to train it.
        device: Where QLoRA quantizes (default: the CPU).
        task: ``causal_lm`` (a policy) or ``seq_cls`` (a score model: a sequence classifier with ``num_labels``
            outputs on the backbone, see :func:`load_score_backbone`; LoRA uses peft's ``SEQ_CLS`` task, which
            trains the new head in full). A ``seq_cls`` model loads from full weights only (no adapter chain) and
            keeps its dropout, whatever ``settings.disable_dropout`` says.
        num_labels: Outputs of the ``seq_cls`` head.
        pad_token_id: Set on a ``seq_cls`` model's config: it pools at the last token that is not padding.
    """
    if task not in PEFT_TASK_TYPES:
        raise ValueError(f"task must be one of {', '.join(PEFT_TASK_TYPES)}, got {task!r}")
    check_model_source(settings.name_or_path)
    local = os.path.expanduser(os.path.expandvars(settings.name_or_path))
    chain = read_chain(local) if task == "causal_lm" and os.path.isdir(local) else None
    model = _load_base_model(settings, chain, device=device, task=task, num_labels=num_labels,
                             pad_token_id=pad_token_id)
    model.config.use_cache = False
    if settings.finetune == "qlora":
        use_one_4bit_kernel(model)
    if settings.disable_dropout and task == "causal_lm":
        disable_dropout(model)
    if settings.finetune == "full":
        return _prepare_full_finetuning(model, settings, chain)
    model = _prepare_adapter_training(model, settings)
    model = _attach_adapters(model, settings, chain, lora_config(settings, task))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    _log_trainable(model, settings, chain)
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen, eval-mode deep copy used as the reference of a full fine-tuning run."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
