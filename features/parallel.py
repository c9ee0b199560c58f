"""Row-wise feature work spread over the machine's cores, results in input order.

Text statistics, similarities, n-gram counting and Word2Vec pooling treat every text on its own, so
splitting the texts into chunks and handing them to worker processes changes no number: the
chunks' results are concatenated in input order. Workers are forked (they inherit the imported
modules and a ``context`` object such as a vocabulary or a count matrix, so only the chunks and
their results are pickled) and live for one call. Small inputs, and machines with one usable core,
run in the calling process. How many cores that is: :func:`kernel.threads.usable_cores`.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.text import FIELDS
from kernel.threads import usable_cores

MIN_PARALLEL_ITEMS = 4000  # below this, forking costs more than it saves
CHUNK = 2000  # items per task unless the caller says otherwise
_INHERITED: dict[int, object] = {}  # contexts handed to forked workers by inheritance, not pickling


def _inherited_call(func, token: int, chunk: list):
    return func(chunk, context=_INHERITED[token])


def map_chunks(func: Callable, items: Sequence, chunk: int | None = None, desc: str | None = None,
               progress: bool = False, context=None) -> list:
    """``[func(chunk) for each chunk of items]`` (``func(chunk, context)`` when a context is given),
    computed by one forked worker per core; ``func`` must be a module-level function."""
    chunk = chunk or CHUNK
    chunks = [list(items[i:i + chunk]) for i in range(0, len(items), chunk)]
    workers = min(usable_cores(), len(chunks))
    bar = dict(total=len(chunks), desc=desc, unit="chunk", disable=not progress or desc is None, leave=False)
    call = func if context is None else partial(func, context=context)
    if workers <= 1 or len(items) < MIN_PARALLEL_ITEMS:
        return [call(c) for c in tqdm(chunks, **bar)]
    if context is not None:
        token = id(context)
        _INHERITED[token] = context
        call = partial(_inherited_call, func, token)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(tqdm(pool.map(call, chunks), **bar))
    finally:
        if context is not None:
            _INHERITED.pop(token, None)


def map_battles(func: Callable, battles: pd.DataFrame, widths: Sequence[int], desc: str, progress: bool = False,
                chunk: int | None = None, context=None) -> tuple[np.ndarray, ...]:
    """Row-wise features of battles: ``func`` gets a chunk of ``(prompt, response_a, response_b)`` rows
    and returns one array per part (e.g. side A, side B, shared); each part is stacked over the chunks
    in input order (an empty ``(0, width)`` array when there are no battles)."""
    rows = list(zip(*(battles[c] for c in FIELDS)))
    parts = map_chunks(func, rows, chunk=chunk, desc=desc, progress=progress, context=context)
    return tuple(np.vstack([p[i] for p in parts]) if parts else np.zeros((0, width)) for i, width in enumerate(widths))
