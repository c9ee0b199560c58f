"""One prepared GPU check of the decoder stage: a single call of under 9 minutes on one H100/H200.

Prints one JSON line per phase (and appends it to ``--out``); a phase that fails records its error and
the next phase still runs (a phase that needs an earlier one's stage says so in its error):

1. ``environment``: versions, the GPU, native bf16, the attention kernels available;
2. ``build``: a 42-layer random-weight Gemma-2-9B checkpoint (bf16, built on the GPU; reused from
   ``--cache-dir`` when present);
3. ``fit``: the recipe's fit (``configs/gemma2_9b_qlora.json``: 4-bit, r=64, checkpointing, paged 8-bit
   AdamW) for 4 optimizer steps of batch 2 x 2048 tokens (accumulation 1): peak memory, s/step after
   the first step, tokens/s, MFU;
4. ``predict``: swap TTA at the recipe's ``predict_batch_tokens``: battles/s, peak memory, MFU,
   projected minutes for 25k battles;
5. ``attention``: the fitted model's logits and forward time with eager, flex_attention and (if
   installed) flash_attention_2, and SDPA (refused for Gemma-2: it cannot soft-cap);
6. ``memory_after_delete``: GPU memory left once the fold's stage is deleted (the bitsandbytes
   registries included), against the memory before the fit;
7. ``t4_emulation``: the same fit and predict in fp16 with eager attention and the process capped at
   14 GiB (``torch.cuda.set_per_process_memory_fraction``), as on a 16 GB T4.

    python benchmarks/gpu_check.py --out gpu_check.jsonl      # one GPU; exit 0 when every phase passed
    python benchmarks/gpu_check.py --dry-cpu                   # the same path at a tiny size, on CPU (CI)

FLOP accounting: benchmarks/gpu_common.py. Without CUDA (and without ``--dry-cpu``) it exits with code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_common as gpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "gemma2_9b_qlora.json"


@dataclass(frozen=True)
class Size:
    layers: int
    shape: dict = field(default_factory=dict)  # overrides of the Gemma-2-9B shape
    max_length: int = 2048
    train_batch: int = 2
    steps: int = 4
    lora_r: int = 64
    battles: int = 64  # scored with swap TTA (x2 orders)
    predict_batch_tokens: int | None = None  # None: the recipe's
    t4_cap_gib: float = 14.0


FULL = Size(layers=42)
TINY = Size(layers=2, shape=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, vocab_size=400, sliding_window=64), max_length=192, lora_r=4,
            battles=6, predict_batch_tokens=512)


def recipe_params(path: Path, size: Size, **overrides) -> dict:
    """The recipe's decoder params for a short timed fit on the checkpoint at ``path``."""
    params = dict(json.loads(RECIPE.read_text())["stages"]["decoder"]["params"])
    params.update(model=str(path), max_length=size.max_length, lora_r=size.lora_r, lora_alpha=size.lora_r,
                  train_batch_size=size.train_batch, grad_accum=1, max_steps=size.steps, save_steps=0,
                  logging_steps=1, swap_augment=False, warmup_ratio=0.0)
    if size.predict_batch_tokens:
        params["predict_batch_tokens"] = size.predict_batch_tokens
    params.update(overrides)
    return params


class Check:
    """The phases, sharing the checkpoint, the fitted stage and the memory baseline."""

    def __init__(self, size: Size, cache_dir: Path, peak: float | None):
        self.size, self.cache_dir, self.peak = size, cache_dir, peak
        self.config = gpu.gemma2_config(size.layers, **size.shape)
        self.path = None
        self.stage = None
        self.baseline = None
        self.battles = gpu.synthetic_battles(max(size.battles, size.train_batch * size.steps), 4 * size.max_length)

    # -- phases
    def environment(self) -> dict:
        import importlib.metadata as md
        import importlib.util

        import torch

        versions = {}
        for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "flash-attn"):
            try:
                versions[name] = md.version(name)
            except md.PackageNotFoundError:
                versions[name] = None
        out = {"versions": versions, "python": sys.version.split()[0], "cuda": torch.version.cuda,
               "attention_kernels": {"eager": True, "sdpa": True,
                                     "flex_attention": importlib.util.find_spec("torch.nn.attention.flex_attention")
                                     is not None, "flash_attention_2": versions["flash-attn"] is not None}}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out.update(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                       memory_gib=props.total_memory / 2**30, peak_tflops=self.peak,
                       native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
        else:
            out.update(device="cpu", native_bf16=None)
        return out

    def build(self) -> dict:
        start = time.perf_counter()
        self.path = gpu.cached_checkpoint(self.cache_dir, self.size.layers,
                                          lambda p: gpu.build_decoder_checkpoint(p, self.config))
        size = sum(f.stat().st_size for f in self.path.glob("*.safetensors"))
        return {"path": str(self.path), "layers": self.size.layers, "hidden_size": self.config.hidden_size,
                "checkpoint_gib": size / 2**30, "build_seconds": time.perf_counter() - start}

    def _fit(self, **overrides):
        from models.decoder import DecoderStage
        from models.stage import StageContext

        if self.path is None:
            raise RuntimeError("needs the build phase's checkpoint")

        class Timed(DecoderStage):
            def training_callbacks(self, has_eval):
                self.steps = gpu.step_times()
                return [self.steps]

        s = self.size
        gpu.reset_peak()
        stage = Timed(recipe_params(self.path, s, **overrides), StageContext(progress=False))
        start = time.perf_counter()
        stage.fit(self.battles.iloc[: s.train_batch * s.steps])
        seconds = time.perf_counter() - start
        times = stage.steps.times
        per_step = (times[-1] - times[0]) / (len(times) - 1)  # the first step is the warm-up
        tokens_per_s = s.train_batch * s.max_length / per_step
        fwd = gpu.forward_flops_per_token(self.config, s.max_length)
        from models.deep import quantization

        figures = {"precision": stage.precision.name, "quantized_layers": quantization.quantized_layers(stage.model),
                   "attention": stage.model.get_base_model().config._attn_implementation,
                   "optimizer_steps": len(times), "seconds_per_step": per_step, "tokens_per_s": tokens_per_s,
                   "mfu": 2 * fwd * tokens_per_s / (self.peak * 1e12) if self.peak else None,
                   "peak_memory_gib": gpu.peak_gib(), "fit_seconds_with_loading": seconds,
                   "losses": [e["loss"] for e in stage.log_history if "loss" in e]}
        return stage, figures

    def fit(self) -> dict:
        self.baseline = _memory()
        self.stage, figures = self._fit()
        return figures

    def predict(self) -> dict:
        if self.stage is None:
            raise RuntimeError("needs the fit phase's stage")
        return self._predict(self.stage)

    def _predict(self, stage) -> dict:
        fwd = gpu.forward_flops_per_token(self.config, self.size.max_length)
        figures = gpu.time_prediction(stage, self.battles.iloc[: self.size.battles], self.size.max_length, fwd,
                                      self.peak)
        return {"battles": self.size.battles, "predict_batch_tokens": stage.params.predict_batch_tokens, **figures}

    def attention(self) -> dict:
        import torch

        if self.stage is None:
            raise RuntimeError("needs the fit phase's stage")
        from models.deep.quantization import choose_attention

        stage, base = self.stage, self.stage.model.get_base_model()
        device = next(p for p in base.parameters() if p.is_floating_point()).device
        ids = stage.encode(self.battles.iloc[: self.size.train_batch]).input_ids
        batch = stage.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                  "use_cache": False}
        original = base.config._attn_implementation
        results, reference = {}, None
        # flex_attention compiles for minutes on CPU: there, tests/test_deep_gpu_path.py compares it with eager
        candidates = ["eager", "sdpa"] + (["flex_attention"] if device.type == "cuda" else []) + \
            (["flash_attention_2"] if _has_flash() else [])
        for name in candidates:
            try:
                choose_attention(base.config.model_type, name, device)  # the stage's own refusal (SDPA)
                base.set_attn_implementation(name)
                with torch.inference_mode(), stage.precision.autocast(device):
                    stage.model(**inputs)  # warm-up (flex compiles its kernel here)
                    gpu.sync()
                    start = time.perf_counter()
                    for _ in range(3):
                        logits = stage.model(**inputs).logits.float()
                    gpu.sync()
                seconds = (time.perf_counter() - start) / 3
                if reference is None:
                    reference = logits
                results[name] = {"forward_seconds": seconds, "finite": bool(torch.isfinite(logits).all()),
                                 "max_abs_diff_vs_eager": float((logits - reference).abs().max())}
            except Exception as exc:  # one kernel failing is a figure, not the end of the phase
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        base.set_attn_implementation(original)
        return {"chosen_by_the_stage": original, "rows": len(ids), "tokens": int(batch["input_ids"].numel()),
                "kernels": results}

    def memory_after_delete(self) -> dict:
        import bitsandbytes as bnb

        if self.stage is None:
            raise RuntimeError("needs the fit phase's stage")
        held = _memory()
        self.stage = None
        gc.collect()
        after = _memory()
        manager = bnb.optim.GlobalOptimManager.get_instance()
        return {"before_fit": self.baseline, "with_stage": held, "after_delete": after,
                "left_over_gib": None if after["device_used_gib"] is None else
                after["device_used_gib"] - self.baseline["device_used_gib"],
                "bnb_optim_manager_modules": len(manager.module_weight_config_triple),
                "bnb_paged_tensors": len(bnb.functional.GlobalPageManager.get_instance().paged_tensors)}

    def t4_emulation(self) -> dict:
        import torch

        cap = None
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            cap = self.size.t4_cap_gib * 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        precision = "fp16" if torch.cuda.is_available() else "auto"  # fp16 needs a GPU; CPU: the same path in fp32
        try:
            stage, fit = self._fit(precision=precision, attn_implementation="eager")
            try:
                predict = self._predict(stage)
            finally:
                del stage
                gc.collect()
        finally:
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.cuda.empty_cache()
        return {"memory_cap_gib": self.size.t4_cap_gib if cap else None, "fit": fit, "predict": predict}


def _has_flash() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _memory() -> dict:
    """torch's allocated/reserved memory and the device's used memory (managed memory included), GiB."""
    import torch

    if not torch.cuda.is_available():
        return {"allocated_gib": None, "reserved_gib": None, "device_used_gib": None}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": torch.cuda.memory_allocated() / 2**30, "reserved_gib": torch.cuda.memory_reserved() / 2**30,
            "device_used_gib": (total - free) / 2**30}


PHASES = ("environment", "build", "fit", "predict", "attention", "memory_after_delete", "t4_emulation")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-cpu", action="store_true", help="the same phases at a tiny size on CPU (a test of the script)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/gpu-check-gemma2-9b"),
                    help="where the random checkpoint is built (and reused)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    ap.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        ap.error(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    return args


def main(argv=None) -> int:
    import logging

    import torch

    args = parse_args(argv)
    if not args.dry_cpu and gpu.refuse_without_cuda("gpu_check"):
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    size = TINY if args.dry_cpu else FULL
    cache = args.cache_dir / ("dry-cpu" if args.dry_cpu else "full")
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    check = Check(size, cache, gpu.peak_tflops(device_name, args.peak_tflops))
    failed = 0
    for name in args.phases:
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only (the Trainer prints)
                record = {"phase": name, "ok": True, **getattr(check, name)()}
        except Exception as exc:
            failed += 1
            record = {"phase": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "where": traceback.format_exc(limit=-3)[-1500:]}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record["seconds"] = time.perf_counter() - start
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as out:
                out.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
