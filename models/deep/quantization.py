"""Loading a decoder for (Q)LoRA: bitsandbytes 4/8-bit on every device it supports, LoRA, optimiser, dtypes.

One code path on GPU and CPU: bitsandbytes (>= 0.46) runs NF4 4-bit and 8-bit layers and its 8-bit
(paged) AdamW on CPU as well, so a CPU run quantises exactly as a GPU run does. Only where the
installed bitsandbytes has no backend for the device (or cannot be imported) does the model load
unquantised, and the log says so.

Under FSDP (``accelerate launch`` with an FSDP config, ``ACCELERATE_USE_FSDP``) the peft/bitsandbytes
FSDP-QLoRA recipe applies: the 4-bit storage dtype equals the compute dtype (so FSDP can shard the
packed weights with the rest), no ``prepare_model_for_kbit_training``, no ``device_map`` (FSDP places
the shards), adapters kept in the compute dtype, and activation checkpointing left to FSDP when its
config turns it on. That path has not been run on GPUs in this repository.

One weight layout for training and prediction: peft's k-bit preparation upcasts every frozen
non-quantised weight (the embedding, 0.92B weights in Gemma-2-9B, and the norms) to fp32; since
bitsandbytes' layers return their input's dtype, the whole residual stream would then run in fp32
while training (1.84 GB more for the embedding alone, and other numerics than at prediction).
:func:`add_lora` puts them back in the dtype they were loaded in (the compute dtype).

Attention (:func:`choose_attention`): Gemma-2 needs its attention-logit soft-capping, which SDPA
lacks; on a CUDA GPU of compute capability 8.0 or newer it runs ``flash_attention_2`` (flash-attn
>= 2.6 installed) or else ``flex_attention`` (both keep soft-capping), elsewhere ``eager``.
Other families keep transformers' own choice (SDPA). ``attn_implementation`` overrides it; SDPA for
Gemma-2 is refused.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections import Counter

import torch

from models.deep.precision import Precision, fp32_residual_stream

log = logging.getLogger(__name__)

QUANTIZATIONS = ("4bit", "8bit", "none")
HEAD = "score"  # the sequence-classification head of AutoModelForSequenceClassification decoders
SOFT_CAPPED = ("gemma2",)  # model types whose attention logits are soft-capped (SDPA cannot do that)
FLASH_ATTN_MIN = (2, 6)  # flash-attn's first version with soft-capping


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def uses_fsdp() -> bool:
    """True inside ``accelerate launch`` with an FSDP config."""
    return _env_flag("ACCELERATE_USE_FSDP")


def bitsandbytes_missing(device: torch.device) -> str | None:
    """Why bitsandbytes cannot quantise on ``device`` (``None`` when it can)."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({exc})"
    if device.type not in getattr(bnb, "supported_torch_devices", set()):
        return f"bitsandbytes {bnb.__version__} has no {device.type} backend"
    return None


def quantization_config(quantization: str, device: torch.device, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``quantization`` on ``device``; ``None`` for unquantised loading.

    4-bit: NF4 with double quantisation, computing in ``compute_dtype`` and stored in it too (the FSDP
    requirement; on one device it changes nothing). The head is never quantised: it is trained in full.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return None
    missing = bitsandbytes_missing(device)
    if missing:
        log.warning("%s: loading the decoder UNQUANTISED (%s) instead of %s", missing, compute_dtype, quantization)
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype,
                                  llm_int8_skip_modules=[HEAD])
    # bitsandbytes logs a warning on every 8-bit matmul whose input is not fp16 (it casts): once is enough.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[HEAD])


def quantized_layers(model) -> dict[str, int]:
    """How many bitsandbytes layers of each kind ``model`` holds, e.g. ``{"Linear4bit": 196}``."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return {}
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, kinds)))


def load_base_model(path, quantization: str, precision: Precision, device: torch.device, pad_token_id: int,
                    attn_implementation: str | None = None):
    """``AutoModelForSequenceClassification`` (3 labels) from ``path``, quantised per :func:`quantization_config`.

    The KV cache is switched off in the config: a classifier never generates, and a cache of every
    layer's keys and values for a 16k-token batch costs gigabytes.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    bnb = quantization_config(quantization, device, precision.dtype)
    attention = choose_attention(AutoConfig.from_pretrained(path).model_type, attn_implementation, device)
    kwargs = {"num_labels": 3, "dtype": precision.dtype, "quantization_config": bnb}
    if attention:
        kwargs["attn_implementation"] = attention
    if not uses_fsdp():
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    _keep_cpu_layout(model)
    if precision.name == "fp16":
        fp32_residual_stream(model)
    layers = quantized_layers(model)
    log.info("decoder base %s on %s: %s, weights %s, attention %s", path, device,
             ", ".join(f"{n} {k} layers" for k, n in layers.items()) or "unquantised", precision.dtype,
             model.config._attn_implementation)
    return model


def _flash_attention_version() -> tuple[int, ...] | None:
    try:
        from importlib.metadata import version

        return tuple(int(x) for x in version("flash-attn").split(".")[:2])
    except Exception:  # not installed, or a version string we cannot read
        return None


def choose_attention(model_type: str, requested: str | None, device: torch.device) -> str | None:
    """The attention implementation to load ``model_type`` with (None: transformers' own choice)."""
    if requested:
        if model_type in SOFT_CAPPED and requested == "sdpa":
            raise ValueError(f"attn_implementation sdpa cannot soft-cap {model_type}'s attention logits; use eager, "
                             "flex_attention or flash_attention_2 (or leave it unset: chosen per device)")
        return requested
    if model_type not in SOFT_CAPPED:
        return None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        flash = _flash_attention_version()
        if flash is not None and flash >= FLASH_ATTN_MIN and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
            return "flex_attention"
    return "eager"


def _keep_cpu_layout(model) -> None:
    """Keep 4-bit weights in bitsandbytes' one layout on CPU too.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight for a faster CPU kernel on its first inference
    forward (CPUs with AVX512-BF16). A repacked layer no longer passes gradients to anything (observed:
    every LoRA and head gradient is None afterwards), which would silently stop the next fold's training
    on the shared base model; and it needs in_features >= 64. Training and inference use the standard
    layout instead.
    """
    try:
        import bitsandbytes as bnb
    except Exception:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def add_lora(model, params, seed: int):
    """Fresh LoRA adapters (and a fresh head) on ``model``, ready to train.

    The head is re-initialised in fp32 from ``seed`` with a small std (``head_init_std``) so training
    starts from near-uniform predictions; LoRA weights are drawn from the same seed, so a fold trained
    on a reused base model equals one trained in a fresh process. Quantised models get peft's k-bit
    preparation (frozen base, input gradients for checkpointing) except under FSDP (the documented
    FSDP-QLoRA recipe skips it), without its fp32 upcast of the frozen weights: they keep the dtype they
    were loaded in, so the residual stream runs in the compute dtype in training as at prediction.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    fsdp = uses_fsdp()
    set_seed(seed)
    head = getattr(model, HEAD)
    head.to(torch.float32)
    torch.nn.init.normal_(head.weight, mean=0.0, std=float(params.head_init_std))
    checkpointing = bool(params.gradient_checkpointing) and not (fsdp and _env_flag("FSDP_ACTIVATION_CHECKPOINTING"))
    gc_kwargs = {"use_reentrant": False}
    if is_quantized(model) and not fsdp:
        loaded = {name: p.dtype for name, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        for name, p in model.named_parameters():  # undo its fp32 upcast of the frozen embedding and norms
            if p.is_floating_point() and p.dtype != loaded[name]:
                p.data = p.data.to(loaded[name])
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    config = LoraConfig(r=int(params.lora_r), lora_alpha=int(params.lora_alpha), lora_dropout=float(params.lora_dropout),
                        target_modules=list(params.target_modules), layers_to_transform=params.layers_to_transform,
                        task_type="SEQ_CLS", modules_to_save=[HEAD])
    model = get_peft_model(model, config, autocast_adapter_dtype=not fsdp)
    if not fsdp:
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()  # the head and LoRA train in fp32 (the loss scaler needs fp32 grads)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%s on %s: %s trainable parameters", params.lora_r, list(params.target_modules), f"{trainable:,}")
    return model


def inference_layout(model, compute_dtype: torch.dtype) -> None:
    """One parameter layout for prediction, whether the model was just trained or just loaded.

    Every floating weight in the compute dtype, the adapters (LoRA, the trained head) included: they
    train in fp32, but inference runs under autocast in the compute dtype, which casts each adapter
    weight to it at every matmul anyway, so holding them in it changes no logit and halves their memory
    (fold adapters at r=64 on Gemma-2-9B: 0.86 GB each in fp32, five on a 16 GB T4). Quantised weights
    are untouched. This is the one place the layout is set, after training and after loading, so the
    predictions right after training equal those after reloading; what ``save`` writes after training
    is this layout (adapters in the compute dtype: fp32 on CPU, where nothing changes).
    """
    try:
        import bitsandbytes as bnb

        packed = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    except Exception:
        packed = ()
    for p in model.parameters():
        if isinstance(p, packed) or not p.is_floating_point():
            continue
        if p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)


def optimizer_name(device: torch.device) -> str:
    """bitsandbytes' 8-bit AdamW wherever bitsandbytes runs on ``device`` (paged on CUDA: optimizer state
    pages out to host memory instead of running out), not under FSDP; else torch's AdamW."""
    if uses_fsdp():
        return "adamw_torch"
    missing = bitsandbytes_missing(device)
    if missing:
        log.info("%s: optimizer adamw_torch instead of bitsandbytes' 8-bit AdamW", missing)
        return "adamw_torch"
    return "paged_adamw_8bit" if device.type == "cuda" else "adamw_8bit"
