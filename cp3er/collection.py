"""Collectors of the training environments stepped by workers (``collector.workers``,
``collector.backend``): TorchRL's multi-process collectors here (``local``) or its
``RayCollector`` on a Ray cluster (``ray``), all feeding the one learner.

Both yield ``[workers, T]`` stacks when ``collector.sync`` (row ``k`` = worker ``k``, replay
stream ``k``), else one worker's ``[T]`` chunk (routed by ``("collector", "traj_ids")``).
What the Ray backend adds (trajectory-id offsets, whole-batch random steps, gloo weight
sync with a longer join timeout, contiguous CPU weights, Ray's lifetime and the SIGTERM
handler) and why: docs/scale.md, "Collection on other machines (Ray)".
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import math
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.collectors import (
    BaseCollector,
    Collector,
    MultiAsyncCollector,
    MultiSyncCollector,
)

from cp3er.choices import COLLECTOR_BACKENDS

#: how long the Ray backend waits for its actors to join the weight-sync group
#: (:func:`lengthen_ray_weight_sync_timeout`; TorchRL's own: 60 s)
RAY_WEIGHT_SYNC_TIMEOUT = timedelta(minutes=5)
#: how to install the Ray backend's dependency (the ``ray`` extra of pyproject.toml)
RAY_INSTALL = "pip install -e '.[ray]'"
#: Ray worker ``k`` numbers its episodes from ``k * TRAJ_ID_OFFSET``
TRAJ_ID_OFFSET = 1 << 40
#: each Ray worker (an actor) reserves one CPU of the cluster
RAY_WORKER_RESOURCES = {"num_cpus": 1}


def ray_installed() -> bool:
    """Whether ``import ray`` would find Ray (without importing it)."""
    return importlib.util.find_spec("ray") is not None


def worker_collector(factories: Sequence[Callable], policy: torch.nn.Module, *,
                     backend: str, sync: bool, chunk: int, total_frames: int,
                     init_random_frames: int, **common: Any) -> BaseCollector:
    """The collector of ``len(factories)`` workers, worker ``k`` stepping the env of
    ``factories[k]`` with ``policy`` (the workers' copy, refreshed by
    ``update_policy_weights_()``), ``chunk`` agent steps a worker per batch, for
    ``total_frames`` agent steps, the first ``init_random_frames`` with random actions.

    ``backend="local"``: TorchRL's ``MultiSyncCollector`` (``sync``: ``[workers, chunk]``
    stacks, the workers idle while the learner updates) or ``MultiAsyncCollector`` (each
    worker's ``[chunk]`` as it comes), spawned processes. ``backend="ray"``: TorchRL's
    ``RayCollector`` over one ``Collector`` actor per worker, yielding the same batches
    (module docstring for what differs); Ray must be initialized (:func:`ray_runtime`).
    ``common``: the other keyword arguments of the local collectors (``device``,
    ``storing_device``, ...)."""
    workers = len(factories)
    frames_per_batch = workers * chunk if sync else chunk
    if backend == "local":
        local = {"frames_per_batch": frames_per_batch, "total_frames": total_frames,
                 "init_random_frames": init_random_frames, "update_at_each_batch": False,
                 **common}
        if sync:
            return MultiSyncCollector(factories, policy, cat_results="stack", **local)
        return MultiAsyncCollector(factories, policy, **local)
    if backend != "ray":
        raise ValueError(f"unknown collector backend {backend!r}; valid choices: "
                         f"{', '.join(COLLECTOR_BACKENDS)}")
    from torchrl.collectors.distributed import RayCollector

    lengthen_ray_weight_sync_timeout()
    device = common.pop("device", None)
    storing_device = common.pop("storing_device", None)
    make_contiguous_(policy)
    with warnings.catch_warnings():  # its async init_random_frames caveat: module docstring
        warnings.filterwarnings("ignore", message="async distributed data collection with "
                                "init_random_frames", category=UserWarning)
        collector = RayCollector(
            list(factories), policy, collector_class=Collector,
            collector_kwargs=[{"postproc": functools.partial(offset_traj_ids,
                                                             offset=k * TRAJ_ID_OFFSET),
                               **common} for k in range(workers)],
            num_collectors=workers, sync=sync, frames_per_batch=frames_per_batch,
            total_frames=total_frames,
            init_random_frames=ray_random_steps(init_random_frames, workers, chunk),
            device=device, storing_device=storing_device,
            remote_configs=dict(RAY_WORKER_RESOURCES))
    try:
        collector.update_policy_weights_()  # connects the weight transport (before iterating)
    except BaseException:
        collector.shutdown()  # its actors, also on a cluster this process did not start
        raise
    return collector


def lengthen_ray_weight_sync_timeout(timeout: timedelta = RAY_WEIGHT_SYNC_TIMEOUT) -> None:
    """Let TorchRL's Ray weight sync wait ``timeout`` (at least) for the actors to join its
    gloo group (module docstring). Our own workaround: TorchRL 0.14 hard-codes 60 s in
    ``torchrl.weight_update._ray._DIST_TIMEOUT`` and takes no argument for it. A TorchRL
    without that constant is left as it is."""
    from torchrl.weight_update import _ray as ray_weight_sync

    current = getattr(ray_weight_sync, "_DIST_TIMEOUT", None)
    if isinstance(current, timedelta) and current < timeout:
        ray_weight_sync._DIST_TIMEOUT = timeout


def ray_random_steps(steps: int, workers: int, chunk: int) -> int:
    """The ``init_random_frames`` to give ``RayCollector`` for ``steps`` random agent steps
    in all: rounded up to whole batches of all workers (``workers x chunk``), so each
    worker's share (``RayCollector`` gives each ``// workers``) is whole chunks and the
    total is the local synchronous collector's (module docstring)."""
    if steps <= 0:
        return 0
    whole = workers * chunk
    return math.ceil(steps / whole) * whole


def make_contiguous_(module: torch.nn.Module) -> torch.nn.Module:
    """Puts ``module``'s parameters and buffers in contiguous memory, in place (a
    ``load_state_dict`` into them keeps it). TorchRL 0.14.1's ``RayWeightSyncScheme`` sends
    and receives each tensor with a gloo ``send``/``recv``, which refuse a non-contiguous
    tensor ("input tensor has to be contiguous"): the channels-last conv weights of the
    pixel encoder (``perf.channels_last``). The workers' encoder then convolves its
    channels-last input with contiguous weights."""
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_contiguous():
            tensor.data = tensor.data.contiguous()
    return module


def offset_traj_ids(batch: TensorDictBase, offset: int) -> TensorDictBase:
    """A Ray worker's ``postproc``: its ``("collector", "traj_ids")`` plus ``offset``."""
    key = ("collector", "traj_ids")
    if offset and key in batch.keys(include_nested=True):
        batch.set(key, batch.get(key) + offset)
    return batch


def ray_init_config(address: str | None, workers: int) -> dict[str, Any]:
    """``ray.init`` keyword arguments: the cluster at ``address`` (``auto``,
    ``ray://host:10001``, ...), or a Ray started on this machine with ``workers`` CPUs
    (``address`` null); no dashboard, the workers' output not copied to this process,
    Ray's own log lines from warnings up."""
    config: dict[str, Any] = {"address": address, "include_dashboard": False,
                              "log_to_driver": False, "logging_level": "warning"}
    if address is None:
        config["num_cpus"] = workers
    return config


class WorkerDiedError(RuntimeError):
    """A collector worker (a process, a Ray actor) died; the message names it."""


_WORKER_FAILED = re.compile(r"process(es)? failed|worker \d+ \(exit code|worker \d+ failed to "
                            r"initiali[sz]e", re.IGNORECASE)


def worker_death(error: BaseException) -> WorkerDiedError | None:
    """``error``, raised while waiting for the workers' batches, as a one-line
    :class:`WorkerDiedError` if it says a worker died: TorchRL's local collectors raise
    ``RuntimeError: At least one process failed: worker 1 (exit code -9)``, Ray an
    ``ActorDiedError``/``RayActorError``; ``None`` for any other error."""
    kind = type(error).__name__
    text = (str(error).strip().splitlines() or [kind])[0]
    if "ActorDied" in kind or "RayActorError" in kind:
        return WorkerDiedError(f"a collector worker (Ray actor) died: {text}")
    if isinstance(error, RuntimeError) and _WORKER_FAILED.search(text):
        found = re.search(r"worker (\d+) \(exit code (-?\d+)\)", text)
        starting = re.search(r"worker (\d+) failed to initiali[sz]e", text, re.IGNORECASE)
        if starting is not None:
            return WorkerDiedError(f"collector worker {starting[1]} died during its start-up "
                                   "(building its environment)")
        if found is None:
            return WorkerDiedError(f"a collector worker died: {text}")
        return _worker_died(int(found[1]), int(found[2]))
    return None


def _worker_died(worker: int, code: int | None) -> WorkerDiedError:
    how = (f", killed by {signal.Signals(-code).name}"
           if code is not None and -code in signal.valid_signals() else "")
    return WorkerDiedError(f"collector worker {worker} died (exit code {code}{how})")


@contextlib.contextmanager
def watching_workers(collector: BaseCollector, poll_s: float = 0.5) -> Iterator[None]:
    """Run the block (a weight push: TorchRL waits for every worker's acknowledgement
    without a timeout, forever for a dead one) while a thread polls the local collector's
    worker processes: a dead one interrupts the main thread's wait (SIGUSR1), which raises
    :class:`WorkerDiedError` naming it. Without worker processes (Ray) or off the main
    thread, just the block."""
    procs = list(getattr(collector, "procs", None) or [])
    if not procs or threading.current_thread() is not threading.main_thread():
        yield
        return
    died: list[WorkerDiedError] = []
    main, stop = threading.main_thread().ident, threading.Event()

    def interrupt(signum, frame) -> None:
        if died:
            raise died[0]

    def watch() -> None:
        while not stop.wait(poll_s):
            for index, proc in enumerate(procs):
                if not proc.is_alive():
                    died.append(_worker_died(index, proc.exitcode))
                    signal.pthread_kill(main, signal.SIGUSR1)
                    return

    previous = signal.signal(signal.SIGUSR1, interrupt)
    watcher = threading.Thread(target=watch, name="cp3er-worker-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


class RayClusterError(RuntimeError):
    """The Ray cluster cannot hold the requested collector workers."""


@contextlib.contextmanager
def ray_runtime(address: str | None, workers: int) -> Iterator[None]:
    """Ray for the duration of the block (module docstring): ``ray.init`` with
    :func:`ray_init_config` unless Ray is initialized in this process already,
    ``ray.shutdown()`` at the end only if it was started here; the SIGTERM handler kept.
    Raises :class:`RayClusterError` when the cluster has fewer than ``workers`` CPUs (the
    workers' actors would wait for them forever)."""
    import ray

    started = not ray.is_initialized()
    if started:
        in_main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if in_main else None
        try:
            ray.init(**ray_init_config(address, workers))
        finally:
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers:
            where = "this machine's Ray" if address is None else f"the Ray cluster at {address}"
            raise RayClusterError(f"collector.workers={workers} needs {workers} CPUs (one per "
                                  f"worker); {where} has {cpus:g}")
        yield
    finally:
        if started:
            ray.shutdown()


def start_collector(make: Callable[[], BaseCollector]) -> BaseCollector:
    """``make()``; a worker dying while it starts is a one-line :class:`WorkerDiedError`,
    raised once the half-built collector is garbage (its weight-sync queues hung the exit)."""
    try:
        return make()
    except Exception as error:
        died = worker_death(error)
        if died is None:
            raise
    gc.collect()  # outside the except: nothing refers to the half-built collector
    raise died


def batches(collector: BaseCollector) -> Iterator[TensorDictBase]:
    """The collector's batches; a worker that died is a one-line :class:`WorkerDiedError`."""
    stream = iter(collector)
    while True:
        try:
            batch = next(stream)
        except StopIteration:
            return
        except Exception as error:
            died = worker_death(error)
            if died is None:
                raise
            raise died from None
        yield batch


def push_weights(collector: BaseCollector, worker_policy: torch.nn.Module,
                 policy: torch.nn.Module) -> None:
    """Copy ``policy``'s weights and buffers into the workers' copy, then on to the workers
    (local: in place, shared; Ray: ``update_policy_weights_`` sends them to each actor)."""
    worker_policy.load_state_dict(policy.state_dict())
    try:
        with watching_workers(collector):  # a dead worker never acknowledges
            collector.update_policy_weights_()
    except WorkerDiedError:  # a local worker, named by the watch
        raise
    except Exception as error:  # a Ray actor's death surfaces in its acknowledgement
        died = worker_death(error)
        if died is None:
            raise
        raise died from None
