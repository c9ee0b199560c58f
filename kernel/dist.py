"""This process's place in a multi-process launch (``torchrun`` / ``accelerate launch``), read one way.

Every launcher sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` before the program starts; torch's
process group exists only once something sets it up (the Trainer does, for training). So:

- :func:`rank` / :func:`is_main_process`: the process group's rank once it exists, else ``RANK``
  (valid from the first line of the program: who writes files);
- :func:`local_rank`: which of this machine's GPUs is this process's;
- :func:`process_group`: ``(rank, size)`` of the running process group, ``(0, 1)`` without one (what
  sharding and gathering may rely on);
- :func:`wait_for_everyone`: a barrier, a no-op in one process (and without torch ever imported);
- :func:`join_launch`: set up the process group from the launcher's environment where nothing has yet
  (training gets it from the Trainer; ``run.py predict`` calls this before loading models, so its
  prediction is sharded across the ranks too); :func:`finish_launch`: every rank waits for the others,
  then that group is taken down (``run.py`` calls it after a command succeeded).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys


def _group():
    """``torch.distributed`` when a process group is running, else None (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def rank() -> int:
    group = _group()
    return group.get_rank() if group is not None else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch."""
    return rank() == 0


def process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group; ``(0, 1)`` without one."""
    group = _group()
    if group is None:
        return 0, 1
    return group.get_rank(), group.get_world_size()


def wait_for_everyone() -> None:
    """Under a multi-process launch, block until every rank gets here (e.g. after the main process wrote
    files the others read next). A no-op in one process."""
    group = _group()
    if group is not None:
        group.barrier()


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_joined: list = []  # the accelerate state of a process group join_launch set up (at most one)


def join_launch() -> tuple[int, int]:
    """Under a multi-process launch, the running process group, set up here if nothing has yet;
    ``(rank, world_size)`` as :func:`process_group` gives it, ``(0, 1)`` in one process.

    The group is accelerate's (``PartialState``, as the Trainer's): NCCL with each rank on its own GPU
    (``LOCAL_RANK``), gloo on CPU. A group set up here is taken down when the process exits. Every rank
    must call this at the same point of the program (setting up a group waits for all of them).
    """
    if launched_processes() > 1 and _group() is None:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        atexit.register(state.destroy_process_group)
        _joined.append(state)
        logging.getLogger(__name__).info("joined the launch's process group: rank %d of %d (%s)",
                                         state.process_index, state.num_processes, state.backend)
    return process_group()


def finish_launch() -> None:
    """At the end of a command that succeeded: every rank waits for the others (the main process may
    still be writing the outputs), then the process group :func:`join_launch` set up is taken down.
    A rank that leaves while its peers are still in the group can abort gloo's threads at exit
    ("terminate called without an active exception", exit -6). A no-op without such a group (one
    process, or the Trainer's group during training). A failed command skips this: its rank must not
    wait for peers that may never arrive; the group then goes down at exit as before."""
    if not _joined or _group() is None:
        return
    state = _joined.pop()
    state.wait_for_everyone()
    atexit.unregister(state.destroy_process_group)
    state.destroy_process_group()
