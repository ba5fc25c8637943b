"""Multi-host start-up: ``jax.distributed.initialize`` from the environment.

One trial may span several hosts (SLURM nodes, the workers of a TPU slice). Every host runs the
same program; ``initialize_distributed()`` must be called first, before anything touches a JAX
backend, and then ``jax.devices()`` lists the devices of all hosts and a ``Mesh`` built over
them (``scaling.sharding.make_mesh``) spans the hosts. JAX's own cluster detection does the
work (``jax._src.clusters``: SLURM, Cloud TPU/GKE, Open MPI); this module only decides *whether*
to call it and with which explicit values, so that a single-process run stays a no-op.

Precedence (first match wins):

1. ``SCALING_DISTRIBUTED=off`` disables everything (a single-process run inside a multi-task
   allocation, e.g. one sweep trial per SLURM task).
2. Explicit: ``SCALING_COORDINATOR=host:port``, ``SCALING_NUM_PROCESSES=N``,
   ``SCALING_PROCESS_ID=i`` (any launcher: ssh, k8s, a hand-written script).
3. submitit (``SUBMITIT_EXECUTOR`` set: a ``scaling sweep --backend slurm`` task, on SLURM or
   submitit's local executor): the task layout from ``submitit.JobEnvironment`` (global rank,
   number of tasks, the job's first host as coordinator; ``localhost`` for the local executor),
   port ``JAX_COORDINATOR_PORT`` or one derived from the job id, so every task agrees.
4. SLURM outside submitit: ``srun`` with more than one task (``SLURM_NTASKS > 1`` and the step variables JAX's
   SLURM detector reads); coordinator = first node of the step, port from ``JAX_COORDINATOR_PORT``.
   One task per GPU (JAX's default there) or one task per node (then the task gets all
   ``SLURM_GPUS_ON_NODE`` GPUs).
5. TPU/GKE and anything else JAX detects on its own: ``SCALING_DISTRIBUTED=auto``, or
   automatically when ``TPU_WORKER_HOSTNAMES`` names more than one worker or
   ``MEGASCALE_COORDINATOR_ADDRESS`` is set (multi-slice).

Otherwise nothing is initialised and the run is a single process.
"""

from __future__ import annotations

import os
from typing import Mapping

from scaling.config import ConfigError

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int_env(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: must be an integer, got {raw!r}") from None


def distributed_plan(env: Mapping[str, str]) -> dict | None:
    """Decide how to call ``jax.distributed.initialize`` from environment variables.

    Returns ``None`` for a single-process run, else the keyword arguments for
    ``jax.distributed.initialize`` (``{}`` = let JAX detect the cluster). Pure: reads only ``env``.
    """
    mode = env.get("SCALING_DISTRIBUTED", "").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode not in ("", "auto", "on", "1", "true", "yes"):
        raise ConfigError(f"SCALING_DISTRIBUTED: must be auto or off, got {env['SCALING_DISTRIBUTED']!r}")

    if "SCALING_NUM_PROCESSES" in env:
        n = _int_env(env, "SCALING_NUM_PROCESSES")
        if n < 1:
            raise ConfigError(f"SCALING_NUM_PROCESSES: must be >= 1, got {n}")
        if n == 1:
            return None
        for name in ("SCALING_COORDINATOR", "SCALING_PROCESS_ID"):
            if not env.get(name):
                raise ConfigError(f"{name}: required when SCALING_NUM_PROCESSES={n} (e.g. {name}="
                                  f"{'node0:12345' if name == 'SCALING_COORDINATOR' else '0'})")
        pid = _int_env(env, "SCALING_PROCESS_ID")
        if not 0 <= pid < n:
            raise ConfigError(f"SCALING_PROCESS_ID: must be in [0, {n}), got {pid}")
        return {"coordinator_address": env["SCALING_COORDINATOR"], "num_processes": n, "process_id": pid}

    if env.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        return _submitit_plan(env)

    if all(v in env for v in _SLURM_VARS) and _int_env(env, "SLURM_NTASKS") > 1:
        plan: dict = {"cluster_detection_method": "slurm"}
        # JAX's SLURM detector gives each task only the GPU numbered by its local rank (one task
        # per GPU). With one task per node, hand that task all of the node's GPUs instead.
        nodes = _int_env(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else None
        if nodes and _int_env(env, "SLURM_NTASKS") == nodes and env.get("SLURM_GPUS_ON_NODE"):
            plan["local_device_ids"] = list(range(_int_env(env, "SLURM_GPUS_ON_NODE")))
        return plan

    if mode:  # auto/on: JAX's detectors (Cloud TPU VM metadata, GKE, Open MPI, ...)
        return {}
    workers = [w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    if len(workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


def _submitit_plan(env: Mapping[str, str]) -> dict | None:
    """The plan for a submitit task: ``submitit.JobEnvironment`` reads the layout (from the
    process environment, which ``env`` is in practice)."""
    import hashlib

    import submitit

    try:
        job = submitit.JobEnvironment()
        n, rank, nodes, job_id = job.num_tasks, job.global_rank, job.num_nodes, job.job_id
        local_rank = job.local_rank
        host = "localhost" if env["SUBMITIT_EXECUTOR"] == "local" else job.hostnames[0]
    except (RuntimeError, KeyError, ValueError) as err:
        raise ConfigError(f"SUBMITIT_EXECUTOR: set, but submitit cannot read the task layout ({err}); unset it "
                          "outside a submitit job") from None
    if n <= 1:
        return None
    if "JAX_COORDINATOR_PORT" in env:
        port = _int_env(env, "JAX_COORDINATOR_PORT")
    else:  # every task of the job derives the same port from the job id
        port = 20000 + int(hashlib.sha256(str(job_id).encode()).hexdigest(), 16) % 20000
    plan: dict = {"coordinator_address": f"{host}:{port}", "num_processes": n, "process_id": rank}
    if env.get("SLURM_GPUS_ON_NODE"):  # one task per node: all of its GPUs; else one GPU per task
        gpus = _int_env(env, "SLURM_GPUS_ON_NODE")
        plan["local_device_ids"] = list(range(gpus)) if n == nodes else [local_rank % gpus]
    return plan


def initialize_distributed(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Start the JAX distributed runtime if the environment asks for several processes.

    Call once per process, before any JAX computation. Idempotent. Returns
    ``(process_index, process_count)``: the host's share of the data to load
    (see ``scaling.sharding.host_data_shard`` for the mesh-aware version).
    """
    import jax

    plan = distributed_plan(os.environ if env is None else env)
    if plan is not None and not jax.distributed.is_initialized():
        # CPU devices of several processes talk through gloo (the CPU client has no collectives
        # of its own across processes); GPU and TPU clients ignore the setting
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**plan)
    return jax.process_index(), jax.process_count()
