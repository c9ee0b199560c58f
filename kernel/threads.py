"""How many cores this process may use, and how its OpenMP threads wait for work.

* :func:`usable_cores`: the CPUs this process may run on (``os.sched_getaffinity``: what a container,
  ``taskset`` or a job scheduler allows, not the machine's count), capped by the environment variable
  ``ARENA_STACK_THREADS`` when it is set. Everything that sizes a pool asks here: LightGBM's
  ``num_threads`` default (``models/lgbm.py``), the forked feature workers (``features/parallel.py``)
  and the stacker's candidate workers (``ensemble/stacking.py``).
* Waiting: importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user has chosen how
  OpenMP waits (``OMP_WAIT_POLICY``, or GNU OpenMP's ``GOMP_SPINCOUNT``): :func:`wait_passively`.
  OpenMP threads (LightGBM's) otherwise spin between parallel regions; on a machine that other work
  keeps busy the spinning threads take the cores from the thread that has work, and a LightGBM fit
  takes several times longer in wall and CPU time. OpenMP reads the variable once, when its library is
  loaded, so ``models/lgbm.py`` imports this module before ``lightgbm``. On an idle machine passive
  waiting costs little (``docs/speed.md``). ``OMP_WAIT_POLICY=ACTIVE`` makes the threads spin;
  ``GOMP_SPINCOUNT=300000`` restores GNU OpenMP's own default (spin a while, then sleep), which is what
  ran before this module chose.
"""
from __future__ import annotations

import os

from kernel.errors import UserError

THREADS_VARIABLE = "ARENA_STACK_THREADS"
WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"
USER_WAIT_VARIABLES = (WAIT_POLICY_VARIABLE, "GOMP_SPINCOUNT")  # set by the user: their choice stands


class ThreadSettingError(UserError, ValueError):
    """``ARENA_STACK_THREADS`` is not a whole number of threads, 1 or more."""


def thread_cap() -> int | None:
    """The cap ``ARENA_STACK_THREADS`` sets, or None when it is unset or empty."""
    raw = os.environ.get(THREADS_VARIABLE, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ThreadSettingError(f"environment variable {THREADS_VARIABLE}={raw!r}: must be a whole number of "
                                 "threads, 1 or more (or unset: every core this process may use)")
    return value


def usable_cores() -> int:
    """The cores this process may run on, capped by ``ARENA_STACK_THREADS``; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    cap = thread_cap()
    return max(1, min(cores, cap) if cap is not None else cores)


def wait_passively() -> bool:
    """Make OpenMP threads sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the user
    chose how they wait. Takes effect for OpenMP libraries loaded after the call. True when this call set it."""
    if any(os.environ.get(name, "").strip() for name in USER_WAIT_VARIABLES):
        return False
    os.environ[WAIT_POLICY_VARIABLE] = "PASSIVE"
    return True


wait_passively()  # at import: before anything loads OpenMP (models/lgbm.py imports this module before lightgbm)
