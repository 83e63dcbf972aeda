"""Multi-process start-up for `python -m dsjax.main --distributed`: one process per host (or per GPU), all running
the same command.

With no other flag, `jax.distributed.initialize()` finds the coordinator, the process count and this process's id
itself on a Cloud TPU pod, under SLURM and under Open MPI. Elsewhere (or to override it) pass all of
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. On CPU the processes' collectives go over gloo
(TCP), jax's default (`JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi` picks MPI instead). Must run before anything touches a
JAX device.
"""

from __future__ import annotations

import os

from dsjax.errors import ConfigError

HINT = "--coordinator_address=HOST:PORT --num_processes=N --process_id=I"


def check_flags(distributed: bool, coordinator_address, num_processes, process_id) -> None:
    """Refuses a combination jax would reject later (or silently misread) with one sentence naming the flag."""
    given = {name: value for name, value in (("--coordinator_address", coordinator_address),
                                             ("--num_processes", num_processes), ("--process_id", process_id))
             if value is not None}
    if given and not distributed:
        raise ConfigError(f"{next(iter(given))} is only read with --distributed; add --distributed.")
    if (num_processes is None) != (process_id is None):
        have, missing = (("--process_id", "--num_processes") if num_processes is None
                         else ("--num_processes", "--process_id"))
        raise ConfigError(f"{have} needs {missing} too: pass {HINT}, or none of them to let jax detect the cluster.")
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num_processes={num_processes} must be at least 1.")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                              f"--num_processes={num_processes}.")
        if coordinator_address is None and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            raise ConfigError(f"--num_processes and --process_id need --coordinator_address=HOST:PORT (process 0's "
                              "address, the same on every process).")
    if coordinator_address is not None:
        host, _, port = str(coordinator_address).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. "
                              "10.0.0.1:1234.")


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """jax.distributed.initialize with the explicit values, or auto-detected ones when none is given."""
    import jax

    check_flags(True, coordinator_address, num_processes, process_id)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as err:  # nothing to detect: jax names the first missing value
        raise ConfigError(f"--distributed found no TPU pod, SLURM or Open MPI environment to take the processes "
                          f"from ({err}); pass {HINT}.") from None
