"""Multi-host start-up: one `jax.distributed.initialize` before any other JAX call.

On Cloud TPU pods (and SLURM / Open MPI clusters) JAX discovers the coordinator, the process
count and this process's index from the environment, so `initialize()` needs no arguments;
elsewhere (several GPU machines, or processes on loopback in tests) pass them explicitly. A
single machine needs none of this: leave it off.
"""
from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX job.

  Args:
    coordinator: 'host:port' of process 0's coordination service; None = auto-detect (TPU pods,
      SLURM, Open MPI).
    num_processes, process_id: given with `coordinator`, or both None for auto-detection.
    timeout_s: how long to wait for every process to join.

  Raises:
    ValueError: for an incomplete or inconsistent set of arguments.
  """
  manual = (coordinator, num_processes, process_id)
  if any(v is not None for v in manual) and any(v is None for v in manual):
    raise ValueError(
        "distributed start-up needs all of coordinator ('host:port'), num_processes and "
        f"process_id, or none of them (auto-detect); got {manual}.")
  if num_processes is not None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes}).")
    if ":" not in coordinator:
      raise ValueError(f"coordinator={coordinator!r} must be 'host:port'.")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)

