"""The one precision rule for both deep stages.

``auto`` picks bf16 only where the GPU computes it natively (``torch.cuda.is_bf16_supported(
including_emulation=False)``: Ampere and newer), fp16 with loss scaling elsewhere (T4, V100), and
fp32 on CPU. An explicit ``bf16``/``fp16``/``fp32`` is honoured where the device can run it and refused
with a clear message where it cannot (bf16 on a GPU without native bf16, fp16 on CPU). The choice and
its reason are logged once per fit/load.

fp16 (T4, V100) is used for matrix multiplications only (:func:`fp32_residual_stream`). fp16 ends at
65,504, and a decoder's residual stream (Gemma-2's especially: its embeddings are scaled by
sqrt(hidden), and the stream grows over 42 layers) can pass that; an overflowed value becomes inf, and
the next RMSNorm turns it into NaN logits. So under fp16 a decoder's residual stream, every norm and
the hidden states between layers run in fp32, while the projections (bitsandbytes' 4/8-bit layers,
or ``nn.Linear`` under autocast) still compute in fp16 on the tensor cores. Attention scores cannot
turn into NaN either: soft-capping maps an overflowed score to the cap (``tanh(inf) = 1``) in eager
attention, and flex/flash compute scores in fp32. The cost is activation memory: hidden states take
4 bytes instead of 2. A single projection whose own output passes 65,504 would still overflow (bf16,
on Ampere and newer, has no such limit).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16", "fp16" or "fp32"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def trainer_flags(self) -> dict:
        """``TrainingArguments`` switches: bf16 / fp16 mixed precision (fp16 brings the Trainer's loss scaler)."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}

    def autocast(self, device: torch.device):
        """The autocast context that inference runs under (the same compute dtype as training)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(choice: str, device: torch.device, stage: str = "deep stage") -> Precision:
    """``choice`` ("auto", "bf16", "fp16", "fp32") resolved for ``device``; logged."""
    if choice not in ("auto", *DTYPES):
        raise ValueError(f"{stage} precision must be auto, bf16, fp16 or fp32, got {choice!r}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if choice == "auto":
            result = (Precision("bf16", f"auto: {name} computes bf16 natively") if native_bf16 else
                      Precision("fp16", f"auto: {name} has no native bf16, fp16 with loss scaling"))
        elif choice == "bf16" and not native_bf16:
            raise ValueError(f"{stage}: precision bf16 asked for, but {name} has no native bf16 "
                             "(emulated bf16 is several times slower); use fp16 or auto")
        else:
            result = Precision(choice, f"as configured, on {name}")
    elif choice == "fp16":
        raise ValueError(f"{stage}: precision fp16 needs a CUDA GPU; on {device.type} use auto (fp32) or bf16")
    elif choice == "auto":
        result = Precision("fp32", f"auto: no GPU ({device.type})")
    else:
        result = Precision(choice, f"as configured, on {device.type}")
    log.info("%s precision: %s (%s)", stage, result.name, result.reason)
    return result


def _upcast_output(module, args, output):
    return output.float()


def _upcast_input(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def fp32_residual_stream(model) -> int:
    """The fp16 rule (module docstring): the embedding's output and every norm's input become fp32, so
    the residual stream and the norms run in fp32 while the projections compute in fp16. Forward hooks
    only: the weights keep their dtype and size. Returns how many norms were hooked."""
    model.get_input_embeddings().register_forward_hook(_upcast_output)
    norms = [m for m in model.modules() if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
             or isinstance(m, torch.nn.LayerNorm)]
    for norm in norms:
        norm.register_forward_pre_hook(_upcast_input)
    log.info("fp16: residual stream and %d norms in fp32, projections in fp16", len(norms))
    return len(norms)
