"""The valid values of the run config's choice keys: a leaf (it imports nothing), read by
the schema (:mod:`cp3er.config_schema`) and by the modules that implement each choice."""

#: ``obs``: the observation type -> the env's observation key.
OBS_KEYS = {"pixels": "pixels", "state": "observation"}
OBS_TYPES = tuple(OBS_KEYS)
#: ``device``.
DEVICES = ("cpu", "cuda")
#: ``agent.name``.
AGENTS = ("cp3er", "drqv2")
#: ``agent.consistency.loss``: consistency training on replayed actions (CP3ER), or
#: distillation from a diffusion teacher trained alongside on them (Song et al. 2023).
CONSISTENCY_LOSSES = ("training", "distillation")
#: ``agent.consistency.solver``: the teacher's probability-flow ODE step.
ODE_SOLVERS = ("euler", "heun")
#: ``agent.consistency.coupling``.
COUPLINGS = ("independent", "generator")
#: ``agent.clip``: how the denoiser's output is kept in the action bounds.
CLIP_MODES = ("clamp", "straight_through", "none")
#: ``agent.eval_noise``: what the consistency policy does under
#: ``ExplorationType.DETERMINISTIC``: ``zero_noise`` acts ``D(0, sigma_max | s)``;
#: ``sample`` ignores it and keeps sampling (the reference's evaluation).
DETERMINISTIC_MODES = ("zero_noise", "sample")
#: ``difficulty``: DrQ-v2's exploration-noise decay length per task difficulty.
DIFFICULTIES = ("easy", "medium", "hard")
#: ``replay.sampler``: the sampling modes.
SAMPLER_MODES: tuple[str, ...] = ("proximal", "reference", "uniform")
#: ``replay.storage``: RAM (``LazyTensorStorage``) or disk (``LazyMemmapStorage``).
STORAGES = ("memory", "memmap")
#: ``replay.device``: where the storage lives (``memmap`` is CPU-only: TorchRL's
#: ``LazyMemmapStorage`` refuses other devices).
STORAGE_DEVICES = ("cpu", "cuda")
#: ``collector.backend``: worker processes on this machine, or Ray actors.
COLLECTOR_BACKENDS = ("local", "ray")
#: ``log.backend``.
LOGGER_BACKENDS = ("csv", "tensorboard", "wandb")
#: ``perf.compile_mode``.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: ``perf.precision``.
PRECISIONS = ("fp32", "tf32", "bf16")


def obs_key_for(obs: str) -> str:
    """The observation key of observation type ``obs`` (:data:`OBS_KEYS`)."""
    return OBS_KEYS[str(obs)]
