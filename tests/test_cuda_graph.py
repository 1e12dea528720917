"""``perf.cuda_graph``: the update a CUDA graph can capture, and the capture itself.

On a CPU: what capture needs of the update, checked without a GPU, for every agent
variant: no host read of a tensor value in an update (a dispatch mode records
``aten._local_scalar_dense``, which ``.item()``, ``bool()``, ``float()`` and C++ ops
reading a value all go through) and no tensor made on the host for it (a function mode
records factories called from host data or without a device); the EMA step without
``AveragedModel``'s read; optimisers loaded from a checkpoint keep the implementation they
were built with; the switch refused off a GPU.
On a GPU (skipped here; ``benchmarks/gpu.sh`` runs them): graph replays take the eager
update's steps, an eager update has no implicit synchronisation, a loaded state is
captured again.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from tiny_run import floats
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from agents.agent import CUDA_GRAPH_WARMUP, Agent
from agents.build import build_agent
from cp3er.config_check import ConfigError, validate_config
from cp3er.config_schema import CONFIG_DIR
from cp3er.consistency import ema_target, ema_update
from envs import make_env

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Agent variants whose update a graph must capture: (label, overrides).
VARIANTS = [
    ("cp3er_pixels", ["obs=pixels", "env.image_size=48"]),
    ("cp3er_pixels_bf16_clip", ["obs=pixels", "env.image_size=48", "perf.precision=bf16",
                                "optim.grad_clip=1.0"]),
    ("drqv2_pixels", ["obs=pixels", "env.image_size=48", "agent=drqv2"]),
    ("cp3er_ema", ["obs=state", "agent.consistency.ema_decay=0.99"]),
    ("cp3er_distillation", ["obs=state", "agent.consistency.loss=distillation"]),
    ("cp3er_unshared", ["obs=state", "perf.share_condition=false",
                        "agent.consistency.coupling=generator"]),
    ("cp3er_stable", ["obs=state", "agent=cp3er_stable"]),
    ("cp3er_all_remedies", ["obs=state", "agent.stability.normalize_q=true",
                            "agent.stability.target_spread=0.2",
                            "agent.stability.actor_grad_clip=2.0"]),
]
BATCH = 16


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=[
            "task=cartpole_swingup", "hidden_dim=32", "feature_dim=16",
            f"batch_size={BATCH}", *overrides])


def _agent(overrides: list[str], device: str = "cpu", seed: int = 0) -> tuple[Agent, dict]:
    """An agent built from seed ``seed`` and the shapes of its batches."""
    cfg = _cfg(*overrides, f"device={device}")
    env = make_env(cfg.task_name, cfg.obs, seed=0, image_size=cfg.env.image_size)
    key = "pixels" if cfg.obs == "pixels" else "observation"
    shape = {"key": key, "obs": tuple(env.observation_spec[key].shape),
             "action_dim": int(env.action_spec.shape[-1])}
    env.close()
    torch.manual_seed(seed)
    return build_agent(cfg, env, device), shape


def _batch(shape: dict, seed: int, device: str = "cpu") -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    key, obs = shape["key"], shape["obs"]
    if key == "pixels":
        def draw() -> torch.Tensor:
            return torch.randint(0, 256, (BATCH, *obs), dtype=torch.uint8, generator=gen)
    else:
        def draw() -> torch.Tensor:
            return torch.randn(BATCH, *obs, generator=gen)
    return TensorDict({
        key: draw(),
        "action": torch.rand(BATCH, shape["action_dim"], generator=gen) * 2 - 1,
        "next": {key: draw(), "reward": torch.rand(BATCH, 1, generator=gen),
                 "discount": torch.full((BATCH, 1), 0.97)},
    }, [BATCH]).to(device)


#: Functions that make a tensor from host data (``tensor``, ``as_tensor``) or, with no
#: ``device`` given, on the CPU: inside an update on a GPU such a tensor is built on the
#: host and copied over, a copy a CUDA graph cannot capture (or captures as a constant).
HOST_FACTORIES = {"tensor", "as_tensor", "arange", "linspace", "logspace", "zeros", "ones",
                  "full", "empty", "rand", "randn", "randint", "randperm", "eye"}


def _frames() -> str:
    frames = [f for f in traceback.format_stack(limit=18)[:-2]
              if "/agents/" in f or "/cp3er/" in f or "site-packages/torch" in f]
    return "".join(frames[-6:])


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value by the host (``aten._local_scalar_dense``:
    ``.item()``, ``bool()``, ``float()``, ``int()``, and C++ ops that read a value), with
    the Python frames that caused it: under a CUDA graph capture each is an error (a
    device-to-host copy cannot be captured)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append("host read:\n" + _frames())
        return func(*args, **(kwargs or {}))


class HostMadeTensors(TorchFunctionMode):
    """Records every non-scalar tensor made by a :data:`HOST_FACTORIES` function from host
    data or without a ``device`` (the call as written: a ``TorchFunctionMode`` sees the
    caller's arguments, before defaults are filled in). 0-d results left on the CPU are
    left out: a CPU scalar tensor enters a GPU kernel as an argument, not as a copy; a 0-d
    tensor made from a Python number with a ``device`` is not (on a GPU it is a copy: the
    first GPU run failed its capture on ``torch.as_tensor(sigma_max, device=x.device)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        sent = False  # host data sent to the update's device: a copy, whatever its size
        if name in ("tensor", "as_tensor"):  # from host data, not from a tensor
            on_host = not isinstance(args[0] if args else kwargs.get("data"), torch.Tensor)
            sent = on_host and kwargs.get("device") is not None
        else:
            on_host = name in HOST_FACTORIES and kwargs.get("device") is None
        if on_host and isinstance(out, torch.Tensor) and (out.dim() > 0 or sent):
            self.made.append(f"torch.{name} on the host:\n" + _frames())
        return out


@pytest.mark.parametrize(("label", "overrides"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_an_update_reads_no_tensor_value_on_the_host(label: str, overrides: list[str]) -> None:
    """Every step of the update (losses, backward, gradient clipping, the optimisers'
    steps with the built options, Polyak, EMA) runs without the host reading a tensor
    value or making a tensor for it, once warmed up by one update (optimiser states and
    cached grids created, as in the eager updates before a capture). The checks are
    live: ``AveragedModel.update_parameters`` (the EMA step
    before ``ema_update``) reads, the noise grid built on the CPU at each call (before
    it was cached per device) was made on the host."""
    agent, shape = _agent(overrides)
    agent.update(_batch(shape, 0))  # as the graph's eager warm-up updates
    for seed in (1, 2):
        batch = _batch(shape, seed)
        with HostReads() as reads, HostMadeTensors() as made:
            metrics = agent.update(batch)
        assert not reads.reads, f"{label}: {len(reads.reads)} host reads, first:\n{reads.reads[0]}"
        assert not made.made, f"{label}: {len(made.made)} host-made tensors, first:\n{made.made[0]}"
        assert all(torch.isfinite(v) for v in metrics.values())
    ema = getattr(agent.loss, "ema_denoiser", None)
    if ema is not None:
        with HostReads() as mode:
            ema.update_parameters(agent.loss.policy.denoiser)
        assert mode.reads, "the detector misses AveragedModel's bool(n_averaged == 0)"


def test_ema_update_takes_averaged_models_step() -> None:
    """``ema_update`` = ``AveragedModel.update_parameters`` after :func:`ema_target`'s
    initialisation, bit for bit, over several steps (parameters, buffers, the count)."""
    agent, _ = _agent(["obs=state"])
    denoiser = agent.loss.policy.denoiser
    ours, reference = ema_target(denoiser, 0.9), ema_target(denoiser, 0.9)
    for step in range(3):
        with torch.no_grad():
            for p in denoiser.parameters():
                p.add_(0.1 * (step + 1))
        ema_update(ours, denoiser)
        reference.update_parameters(denoiser)
        for a, b in zip(ours.state_dict().values(), reference.state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)
    assert int(ours.n_averaged) == 4
    moved = next(ours.module.parameters())
    assert not torch.equal(moved, next(denoiser.parameters()))  # an average, not a copy


def test_loaded_optimisers_keep_the_implementation_they_were_built_with() -> None:
    """A checkpoint of an agent with plain Adam loaded into one built with fused Adam (and
    back) keeps each optimiser's own ``fused`` flag (``Optimizer.load_state_dict`` alone
    takes the saved one), the saved learning rate and step counts, moments of its own (not
    the saving agent's tensors), and the next updates equal the saving agent's."""
    saver, shape = _agent(["obs=state", "perf.fused_adam=false"])
    for seed in range(3):
        saver.update(_batch(shape, seed))
    state = saver.state_dict()
    for name in state["optimizers"]:
        state["optimizers"][name]["param_groups"][0]["lr"] = 5e-4
    saver.load_state_dict(state)
    loader, _ = _agent(["obs=state", "perf.fused_adam=true"], seed=7)
    loader.load_state_dict(state)
    for name, optimizer in loader.optimizers.items():
        group = optimizer.param_groups[0]
        assert group["fused"] is True and group["lr"] == 5e-4, name
        steps = {float(s["step"]) for s in optimizer.state.values()}
        assert steps == {3.0}, (name, steps)
    assert all(not g["fused"] for o in saver.optimizers.values() for g in o.param_groups)
    saved = {t.data_ptr() for o in state["optimizers"].values() for s in o["state"].values()
             for t in s.values()}
    assert not saved & {t.data_ptr() for o in loader.optimizers.values()
                        for s in o.state.values() for t in s.values()}  # own moments
    for seed in (10, 11):
        torch.manual_seed(seed)
        expected = floats(saver.update(_batch(shape, seed)))
        torch.manual_seed(seed)
        got = floats(loader.update(_batch(shape, seed)))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_cuda_graph_is_refused_off_a_gpu() -> None:
    """The config check names the switch and what it needs; the agent refuses CPU
    parameters and optimisers that are not capturable."""
    with pytest.raises(ConfigError, match=r"perf\.cuda_graph.*device=cuda"):
        validate_config(_cfg("perf.cuda_graph=true", "device=cpu"))
    agent, _ = _agent(["obs=state"])
    with pytest.raises(ValueError, match=r"CUDA device.*perf\.cuda_graph=false"):
        Agent(agent.policy, agent.loss, agent.optimizers, agent.updater, agent.obs_key,
              cuda_graph=True)


def test_cuda_graph_with_reduce_overhead_compile_is_refused() -> None:
    cfg = _cfg("perf.cuda_graph=true", "perf.compile=true", "perf.compile_mode=reduce-overhead")
    cfg.device = "cuda"  # checked before the machine's device is
    with pytest.raises(ConfigError, match=r"perf\.compile_mode.*reduce-overhead"):
        validate_config(cfg)


# -- on a GPU -----------------------------------------------------------------------------

GPU_UPDATES = CUDA_GRAPH_WARMUP + 6


def _updates(agent: Agent, shape: dict, start: int = 0) -> list[dict[str, float]]:
    """GPU_UPDATES updates on fixed batches, the default CUDA generator seeded once."""
    torch.cuda.manual_seed(1234)
    return [{k: float(v) for k, v in agent.update(_batch(shape, s, "cuda")).items()}
            for s in range(start, start + GPU_UPDATES)]


@needs_cuda
@pytest.mark.parametrize(("label", "overrides"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_graph_replays_take_the_eager_updates_steps(label: str, overrides: list[str]) -> None:
    """The graphed agent's updates (warm-up, capture, replays) report the eager agent's
    metrics and end at its parameters, from the same seeds: the replays read the new
    batches, step the optimisers, draw fresh random numbers (the Philox offset advances
    per replay) and move the targets. Tolerances: cuDNN/atomics reorder sums."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager, shape = _agent(overrides, "cuda")
    graphed, _ = _agent([*overrides, "perf.cuda_graph=true"], "cuda")
    expected, got = _updates(eager, shape), _updates(graphed, shape)
    assert graphed._graphed is not None and graphed._graphed.counter > CUDA_GRAPH_WARMUP
    assert len({round(m["loss_critic"], 6) for m in got}) == GPU_UPDATES  # not frozen
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), (label, i, key)
    for a, b in zip(eager.loss.state_dict().values(), graphed.loss.state_dict().values(),
                    strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4)


@needs_cuda
@pytest.mark.parametrize(("label", "overrides"), VARIANTS[:3], ids=[v[0] for v in VARIANTS[:3]])
def test_an_eager_gpu_update_does_not_synchronise(label: str, overrides: list[str]) -> None:
    """``torch.cuda.set_sync_debug_mode("error")``: no implicit host-device
    synchronisation in an update (after the first, which creates the optimiser states)."""
    agent, shape = _agent([*overrides, "perf.fused_adam=true"], "cuda")
    agent.update(_batch(shape, 0, "cuda"))
    batch = _batch(shape, 1, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        agent.update(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_a_loaded_state_is_captured_again() -> None:
    """Loading a state (a resume) into a graphed agent drops its graph; the next updates
    equal an eager agent's from the same state."""
    overrides = ["obs=state"]
    graphed, shape = _agent([*overrides, "perf.cuda_graph=true"], "cuda")
    _updates(graphed, shape)
    source, _ = _agent(overrides, "cuda", seed=3)
    _updates(source, shape, start=50)
    state = source.state_dict()
    graphed.load_state_dict(state)
    assert graphed._graphed is None
    eager, _ = _agent(overrides, "cuda", seed=5)
    eager.load_state_dict(state)
    expected, got = _updates(eager, shape, start=100), _updates(graphed, shape, start=100)
    for a, b in zip(expected, got, strict=True):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), key
