"""Faults a run survives or reports clearly: MuJoCo physics errors (episode truncated,
run goes on), NaN losses/parameters (run stops, last checkpoint intact), gradient clipping."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import tiny_cfg as _cfg

from cp3er import evaluate
from cp3er.checkpoint import atomic_torch_save, load_checkpoint, load_run_checkpoint
from cp3er.faults import NumericalError
from cp3er.train import Trainer
from envs import make_env, physics_errors


def _diverge_at(call: int, step_fn, corrupt):
    """Wrap a step function so that its ``call``-th call starts from a NaN state."""
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            corrupt()
        return step_fn(*args, **kwargs)

    return step


def _check_truncated_at_step_5(env, steps: int = 12) -> None:
    with pytest.warns(UserWarning, match="episode truncated"):
        td = env.rollout(steps, break_when_any_done=False)
    truncated = td["next", "truncated"].reshape(-1).tolist()
    assert truncated == [i == 4 for i in range(steps)], truncated
    assert not td["next", "terminated"].any()
    # the run goes on: a clean reset, then a normal episode
    assert td["next", "step_count"].reshape(-1).tolist() == [1, 2, 3, 4, 5, *range(1, steps - 4)]
    assert torch.isfinite(td["next", "observation"]).all()
    assert torch.isfinite(td["next", "reward"]).all() and td["next", "reward"][4].item() == 0.0
    # the truncated step bootstraps from the last good observation
    assert torch.equal(td["next", "observation"][4], td["observation"][4])
    assert physics_errors(env) == 1


def test_dmc_physics_error_truncates_the_episode() -> None:
    env = make_env("cartpole_balance", "state", seed=0)
    physics = env.base_env._env.physics

    def corrupt():
        physics.data.qpos[:] = np.nan  # a real divergence: dm_control raises PhysicsError

    # agent step 5 = physics steps 9-10 (action repeat 2)
    physics.step = _diverge_at(9, physics.step, corrupt)
    _check_truncated_at_step_5(env)
    env.close()


def test_metaworld_simulation_error_truncates_the_episode() -> None:
    env = make_env("mw_reach", "state", seed=0)
    inner = env.base_env._env.env

    def corrupt():
        inner.unwrapped.data.qpos[:] = np.nan  # MuJoCo warns and resets itself silently

    inner.step = _diverge_at(9, inner.step, corrupt)
    _check_truncated_at_step_5(env)
    # Meta-World's own flag (versions that catch simulator exceptions) is honoured too
    inner.step = _diverge_at(
        3, inner.step, lambda: setattr(inner.unwrapped, "_did_see_sim_exception", True))
    with pytest.warns(UserWarning, match="episode truncated"):
        td = env.rollout(4, break_when_any_done=False)
    assert td["next", "truncated"].reshape(-1).tolist() == [False, True, False, False]
    assert physics_errors(env) == 2
    env.close()


def test_physics_errors_are_counted_in_metrics(tmp_path: Path) -> None:
    # no updates (seed_frames past the end): only the environment matters here
    trainer = Trainer(_cfg(tmp_path, "frames=1400", "schedule.seed_frames=2000"))
    physics = trainer.env.base_env._env.physics

    def corrupt():
        physics.data.qpos[:] = np.nan

    # first episode: 500 agent steps = 1000 physics steps; fail in the second episode
    physics.step = _diverge_at(1300, physics.step, corrupt)
    with pytest.warns(UserWarning, match="episode truncated"):
        trainer.train()
    with open(tmp_path / "metrics.csv", newline="") as handle:
        train = [r for r in csv.DictReader(handle) if r["phase"] == "train"]
    # episode 2 truncated at agent step 650 (frame 1300); episode 3 runs on to frame 1400
    assert [r["frame"] for r in train] == ["1000", "1300"]
    assert [r["physics_errors"] for r in train] == ["0", "1"]
    assert train[1]["episode_length"] == "150"


@pytest.mark.parametrize("where", ["loss", "parameter"])
def test_non_finite_values_stop_the_run_and_keep_the_checkpoint(tmp_path: Path,
                                                                where: str) -> None:
    trainer = Trainer(_cfg(tmp_path, "frames=2000", "checkpoint_every=600"))
    loss = trainer.agent.loss
    if where == "loss":
        critic_loss = loss.critic_loss

        def poisoned(*args):
            value, meta = critic_loss(*args)
            return (value * float("nan") if trainer.frame > 700 else value), meta

        loss.critic_loss = poisoned
        expected = "non-finite loss_critic=nan"
    else:
        optimizer = trainer.agent.optimizers["actor"]
        step = optimizer.step

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if trainer.frame > 700:
                with torch.no_grad():
                    next(iter(optimizer.param_groups[0]["params"])).fill_(float("inf"))
            return out

        optimizer.step = poisoned_step
        poisoned = next(iter(optimizer.param_groups[0]["params"]))
        name = next(n for n, p in loss.named_parameters() if p is poisoned)
        expected = re.escape(f"non-finite values in parameter {name!r}")
    with pytest.raises(NumericalError, match=expected) as info:
        trainer.train()
    # updates every 2 agent steps from step 100: update k at step 98 + 2k; the first
    # poisoned one is at frame 704 (step 352)
    assert "at update 127 (frame 704)" in str(info.value)
    state, replay = load_run_checkpoint(tmp_path)
    assert state["counters"]["step"] == 300  # the checkpoint at frame 600, untouched
    assert all(torch.isfinite(t).all() for t in state["agent"]["loss"].values()
               if t.is_floating_point())
    assert replay.is_dir()


def test_grad_clip_bounds_each_step(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "optim.grad_clip=0.001"))
    agent = trainer.agent
    assert agent.grad_clip == 0.001
    params = list(agent.optimizers["actor"].param_groups[0]["params"])
    # plain SGD, lr 1: the parameter change is exactly the (clipped) gradient
    agent.optimizers["actor"] = torch.optim.SGD(params, lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in params])
    loss = sum((p * 1000).sum() for p in params)  # gradient norm ~ 1000 * sqrt(#params)
    agent._step(("actor",), loss)
    after = torch.cat([p.detach().flatten() for p in params])
    assert float((after - before).norm()) == pytest.approx(0.001, rel=1e-3)


def test_preemption_signals_become_a_flag() -> None:
    import os
    import signal

    from cp3er.faults import Preemption

    previous = signal.getsignal(signal.SIGINT)
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # repeated: still just the flag
        with pytest.raises(KeyboardInterrupt):  # a second SIGINT interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def _explode(module: torch.nn.Module) -> None:
    """Finite but exploding weights (what ``lr=1e6`` does): the parameter check passes,
    the actions overflow to NaN."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1e30)


@pytest.mark.parametrize(("at", "caught"), [(700, "collection, frame 704"),
                                            (1200, "at the checkpoint, frame 1200")])
def test_a_policy_emitting_non_finite_actions_stops_the_run(tmp_path: Path, at: int,
                                                            caught: str) -> None:
    """Weights explode in the update at frame ``at``: the next collected batch (frame 704)
    or the checkpoint right after that update (frame 1200) stops the run; the checkpoint
    kept (frame 600) holds a policy that acts."""
    trainer = Trainer(_cfg(tmp_path, "frames=2000", "checkpoint_every=600"))
    update = trainer.update

    def exploding_update():
        metrics = update()
        if trainer.frame == at:
            _explode(trainer.agent.policy)
        return metrics

    trainer.update = exploding_update
    with pytest.raises(NumericalError, match=re.escape(f"non-finite actions ({caught})")):
        trainer.train()
    state, _ = load_run_checkpoint(tmp_path)
    assert state["counters"]["step"] == 300  # the checkpoint at frame 600, untouched
    written = trainer.buffer.storage._storage["action"][:trainer.buffer.write_count]
    assert torch.isfinite(written).all()  # no NaN-action batch entered the buffer


def test_eval_refuses_a_policy_emitting_non_finite_actions(tmp_path: Path, capsys) -> None:
    Trainer(_cfg(tmp_path / "run", "frames=400")).train()
    capsys.readouterr()  # the run's own lines (its evaluations)
    state = load_checkpoint(tmp_path / "run")
    weights = state["agent"]["loss"]
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            weights[name] = tensor * 1e30
    path = tmp_path / "exploded.pt"
    atomic_torch_save(state, path)
    assert evaluate.main([str(path), "--episodes", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cp3er-eval: the policy emitted non-finite actions (evaluation episode 1): "
                   "the checkpoint's policy is broken")


def test_metrics_read_every_k_updates_are_the_same_rows(tmp_path: Path) -> None:
    """``log.metrics_every_updates=10`` reads the update metrics from the device every 10
    updates (and before every train row and checkpoint): metrics.csv holds exactly the rows
    of a run that reads them after each update."""
    rows = {}
    for k in (1, 10):
        run = tmp_path / f"k{k}"
        Trainer(_cfg(run, "frames=2400", "checkpoint_every=0",
                     f"log.metrics_every_updates={k}")).train()
        rows[k] = [{c: v for c, v in r.items() if c not in ("seconds", "fps")}
                   for r in csv.DictReader(open(run / "metrics.csv"))]
    assert len(rows[1]) >= 2 and rows[10] == rows[1]


@pytest.mark.parametrize("poison", ["gradients", "value"])
def test_a_nan_between_reads_stops_the_run_before_the_next_checkpoint(tmp_path: Path,
                                                                      poison: str) -> None:
    """With K=10 a NaN loss at update 127 (frame 704) is found at the next read, before
    anything is written: the run stops naming the loss and the update, and the last
    checkpoint is the clean one before (frame 356), not the one due at frame 708. A NaN
    that reaches the weights (``gradients``) is read when the next batch's actions come
    out non-finite; one in the loss value only (``value``: finite gradients) when the
    checkpoint at frame 708 forces the read."""
    trainer = Trainer(_cfg(tmp_path, "frames=2000", "checkpoint_every=354",
                           "log.metrics_every_updates=10"))
    loss = trainer.agent.loss
    critic_loss = loss.critic_loss

    def poisoned(*args):
        value, meta = critic_loss(*args)
        if trainer.frame > 700:
            nan = value * float("nan")
            value = nan if poison == "gradients" else value + nan.detach()
        return value, meta

    loss.critic_loss = poisoned
    with pytest.raises(NumericalError, match=r"non-finite loss_critic=nan at update 127 "
                                             r"\(frame 704\)"):
        trainer.train()
    assert trainer.frame == (704 if poison == "gradients" else 708)
    state, _ = load_run_checkpoint(tmp_path)
    assert state["counters"]["step"] == 178  # frame 356: the checkpoint before the NaN


def test_sigusr2_is_a_preemption_then_goes_to_the_previous_handler() -> None:
    """SIGUSR2 (Slurm's warning before a time limit) sets the flag like SIGTERM while the
    loop runs; afterwards ``pass_on`` hands it to the handler installed before (submitit's
    requeue handler in a cluster job), and does nothing when there is none."""
    import os
    import signal

    from cp3er.faults import Preemption, pass_on

    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert preemption.received == signal.SIGUSR2 and not seen
        pass_on(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        pass_on(signal.SIGUSR2)  # not a Python handler: nothing to call
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
