"""The one precision rule for both deep stages.

``auto`` picks bf16 only where the GPU computes it natively (``torch.cuda.is_bf16_supported(
including_emulation=False)``: Ampere and newer), fp16 with loss scaling elsewhere (T4, V100), and
fp32 on CPU. An explicit ``bf16``/``fp16``/``fp32`` is honoured where the device can run it and refused
with a clear message where it cannot (bf16 on a GPU without native bf16, fp16 on CPU). The choice and
its reason are logged once per fit/load.
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
