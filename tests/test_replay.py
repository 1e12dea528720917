"""Tests of cp3er.replay: the PPE sampler (CP3ER, arXiv 2410.00051) and the n-step frame buffer.

Inputs are built by hand, shaped like the batches of a single-env TorchRL collector,
with distinct frame values so that every rebuilt stack can be checked exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from cp3er.replay import (
    SAMPLER_MODES,
    NStepReplayBuffer,
    ProximalSampler,
    RingSampler,
    make_replay_buffer,
    make_sampler,
    proximal_weight,
)

P_MIN = 1e-3  # goodness-of-fit threshold (fixed seeds: deterministic outcomes)


# ----------------------------------------------------------------------------- helpers
def _bin_counts(values: torch.Tensor, n_bins: int, high: int) -> torch.Tensor:
    """Counts of integer values in 1..high over ``n_bins`` equal bins."""
    bins = ((values - 1) * n_bins) // high
    return torch.bincount(bins, minlength=n_bins).double()


def _bin_probs(weights: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Probability mass of ``weights`` (indexed by age - 1) over the same bins."""
    ages = torch.arange(1, weights.numel() + 1)
    bins = ((ages - 1) * n_bins) // weights.numel()
    mass = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, weights.double())
    return mass / mass.sum()


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return float(chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue)


def _ring(capacity: int, written: int, mode: str = "proximal", episode_len: int = 0, **kwargs):
    """A TorchRL buffer with the sampler; rows carry their write position (and episode)."""
    sampler = make_sampler(mode, **kwargs)
    rb = ReplayBuffer(storage=LazyTensorStorage(capacity), sampler=sampler)
    for chunk in torch.arange(written).split(97):  # several extends, wrapping the ring
        episode = chunk // episode_len if episode_len else torch.zeros_like(chunk)
        rb.extend(TensorDict(pos=chunk, episode=episode, batch_size=[chunk.numel()]))
    return rb, sampler


def _sample_ages(rb: ReplayBuffer, sampler: RingSampler, count: int, written: int):
    index, info = sampler.sample(rb.storage, count)
    ages = written - rb.storage[index]["pos"]
    assert torch.equal(ages, info["age"])  # the sampler's age bookkeeping is exact
    return index, ages


# ---------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("written", [700, 2_500], ids=["partial", "wrapped"])
def test_proximal_mode_matches_formula(written: int) -> None:
    capacity, n_bins, draws = 1_000, 20, 200_000
    rb, sampler = _ring(capacity, written)
    torch.manual_seed(0)
    index, ages = _sample_ages(rb, sampler, draws, written)
    stored = min(written, capacity)
    assert int(index.max()) < len(rb.storage) and int(ages.max()) <= stored
    weights = proximal_weight(torch.arange(1, stored + 1), capacity, 2.0)
    counts = _bin_counts(ages, n_bins, stored)
    assert _pvalue(counts, _bin_probs(weights, n_bins)) > P_MIN
    # the test has power: the uniform law is rejected on the same draws
    assert _pvalue(counts, _bin_probs(torch.ones(stored), n_bins)) < 1e-6


def test_paper_weight_values() -> None:
    capacity = 1_000_000
    w = proximal_weight(torch.tensor([1, capacity // 2, capacity, 2 * capacity]), capacity)
    assert w[0] == pytest.approx(1.0)
    assert w[1] == pytest.approx(1 / (1 + math.exp(-4.0)))  # T/dt = 2
    assert w[2] == pytest.approx(0.5)
    assert w[3] == pytest.approx(1 / (1 + math.exp(2.0)))  # T/dt = 1/2


def test_uniform_mode_is_uniform() -> None:
    capacity, n_bins = 1_000, 20
    rb, sampler = _ring(capacity, 2_300, "uniform")
    torch.manual_seed(1)
    _, ages = _sample_ages(rb, sampler, 200_000, 2_300)
    counts = _bin_counts(ages, n_bins, capacity)
    assert _pvalue(counts, _bin_probs(torch.ones(capacity), n_bins)) > P_MIN
    paper = proximal_weight(torch.arange(1, capacity + 1), capacity, 2.0)
    assert _pvalue(counts, _bin_probs(paper, n_bins)) < 1e-6


def test_reference_mode_reproduces_inverted_weighting() -> None:
    # 600 rows, episodes of 50: written 725 -> the oldest retained episode (id 2) has
    # lost half its rows, the newest (id 14) has 25 rows so far.
    capacity, episode_len, written = 600, 50, 725
    rb, sampler = _ring(
        capacity, written, "reference", episode_len, transitions_per_episode=episode_len
    )
    torch.manual_seed(2)
    index, _ = _sample_ages(rb, sampler, 200_000, written)
    episodes = rb.storage[index]["episode"]
    counts = torch.bincount(episodes - 2, minlength=13).double()
    rank = torch.arange(13, dtype=torch.float64)
    # the reference: delta_t = rank * episode_length + 1, rank 0 = oldest stored episode
    weight = torch.sigmoid(4.0 * (capacity / (rank * episode_len + 1.0) - 1.0))
    rows = torch.full((13,), float(episode_len))
    rows[0] = rows[-1] = 25.0
    assert _pvalue(counts, weight * rows / (weight * rows).sum()) > P_MIN
    per_row = counts / rows
    assert per_row[1] > 1.5 * per_row[-2]  # older episodes drawn more: the paper inverted
    # within an episode the rows are uniform
    inside = rb.storage[index[episodes == 5]]["pos"] - 250
    assert _pvalue(torch.bincount(inside, minlength=50).double(), torch.ones(50) / 50) > P_MIN


def test_rejects_invalid_slots_exactly() -> None:
    capacity, written, n_bins = 1_000, 1_800, 10
    rb, sampler = _ring(capacity, written)
    pos = rb.storage[:]["pos"]
    sampler.valid_fn = lambda slots: pos[slots] % 3 != 0
    torch.manual_seed(3)
    index, ages = _sample_ages(rb, sampler, 100_000, written)
    assert bool((pos[index] % 3 != 0).all())
    weights = proximal_weight(torch.arange(1, capacity + 1), capacity, 2.0)
    weights = weights * ((written - torch.arange(1, capacity + 1)) % 3 != 0)
    assert _pvalue(_bin_counts(ages, n_bins, capacity), _bin_probs(weights, n_bins)) > P_MIN


def test_rare_valid_slots_use_exact_fallback() -> None:
    rb, sampler = _ring(500, 500, max_rounds=2)
    sampler.valid_fn = lambda slots: slots == 123
    index, _ = sampler.sample(rb.storage, 64)
    assert bool((index == 123).all())
    sampler.valid_fn = lambda slots: torch.zeros_like(slots, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="No valid slot"):
        sampler.sample(rb.storage, 4)


def test_never_samples_empty_slots() -> None:
    for mode in SAMPLER_MODES:
        rb, sampler = _ring(1_000, 37, mode, episode_len=10, transitions_per_episode=10)
        index, _ = sampler.sample(rb.storage, 5_000)
        assert int(index.max()) < 37 and int(index.min()) >= 0, mode


def test_mode_is_validated() -> None:
    with pytest.raises(ValueError, match=r"proximal.*reference.*uniform"):
        make_sampler("proportional")
    with pytest.raises(ValueError, match="alpha must be positive"):
        ProximalSampler(alpha=0.0)


def test_proximal_sampler_is_the_proximal_mode() -> None:
    """ProximalSampler is make_sampler("proximal"): the same draws from the same seed."""
    rb, by_name = _ring(300, 700)
    direct = ProximalSampler()
    direct.load_state_dict(by_name.state_dict())
    draws = []
    for smp in (by_name, direct):
        torch.manual_seed(6)
        draws.append(smp.sample(rb.storage, 256)[0])
    assert direct.mode == "proximal" and torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("mode", SAMPLER_MODES)
def test_sampler_state_round_trip(mode: str, tmp_path) -> None:
    rb, sampler = _ring(400, 1_030, mode, episode_len=30, transitions_per_episode=30)
    sampler.sample(rb.storage, 8)  # the reference mode scans episodes lazily
    rb.extend(
        TensorDict(
            pos=torch.arange(1_030, 1_100),
            episode=torch.arange(1_030, 1_100) // 30,
            batch_size=[70],
        )
    )
    restored = make_sampler(mode, transitions_per_episode=30)
    restored.load_state_dict(sampler.state_dict())
    loaded = make_sampler(mode, transitions_per_episode=30)
    sampler.dumps(tmp_path / "sampler")
    loaded.loads(tmp_path / "sampler")
    draws = []
    for smp in (sampler, restored, loaded):
        torch.manual_seed(4)
        draws.append(smp.sample(rb.storage, 512)[0])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    torch.manual_seed(5)
    assert not torch.equal(draws[0], sampler.sample(rb.storage, 512)[0])


# ---------------------------------------------------------------- fake collector data
@dataclass
class Episode:
    length: int  # steps collected (the final frame is frame `length` when it ended)
    end: str | None  # "terminated", "truncated", "abandoned" (cut without a done, the next
    # episode starts with a new traj id) or None (still running)

    @property
    def ends(self) -> bool:
        """Whether the episode ends with a done (and gets a final-frame row)."""
        return self.end in ("terminated", "truncated")


class FakeCollector:
    """Collector-shaped batches with distinct frame values (CatFrames semantics)."""

    def __init__(
        self,
        episodes: list[Episode],
        obs_key: str,
        frame_stack: int,
        frame_shape: tuple[int, ...],
        action_dim: int = 2,
    ) -> None:
        self.episodes, self.obs_key, self.stack = episodes, obs_key, frame_stack
        self.frame_shape, self.action_dim = frame_shape, action_dim
        self.value: dict[tuple[int, int], int] = {}  # (episode, frame) -> frame value
        rows = []
        for e, ep in enumerate(episodes):
            for k in range(ep.length + 1):
                self.value[e, k] = len(self.value) + 1
            rows += [(e, t) for t in range(ep.length)]
        assert len(self.value) < 256
        self.rows = rows
        self.cut_by_ring = 0  # rows the last `expected` call excluded for the ring alone

    def reward(self, e: int, t: int) -> float:
        return 10.0 * e + t + 1.0

    def frame(self, e: int, k: int) -> torch.Tensor:
        dtype = torch.uint8 if self.obs_key == "pixels" else torch.float32
        return torch.full(self.frame_shape, self.value[e, k], dtype=dtype)

    def stack_at(self, e: int, k: int) -> torch.Tensor:
        """The stacked observation at frame k: frames k-F+1..k, clamped at the reset."""
        frames = [self.frame(e, max(k - self.stack + 1 + j, 0)) for j in range(self.stack)]
        return torch.cat(frames, 0)

    def batch(self, first: int, last: int) -> TensorDict:
        """Collector batch holding rows first..last-1 of the whole run."""
        obs, nxt, act, rew, term, trunc, traj = [], [], [], [], [], [], []
        for e, t in self.rows[first:last]:
            ep = self.episodes[e]
            ends = t == ep.length - 1 and ep.ends
            obs.append(self.stack_at(e, t))
            nxt.append(self.stack_at(e, t + 1))
            act.append(torch.tensor([float(e), float(t)] + [0.0] * (self.action_dim - 2)))
            rew.append(torch.tensor([self.reward(e, t)]))
            term.append(torch.tensor([ends and ep.end == "terminated"]))
            trunc.append(torch.tensor([ends and ep.end == "truncated"]))
            traj.append(e)
        size = last - first
        term_t, trunc_t = torch.stack(term), torch.stack(trunc)
        false = torch.zeros(size, 1, dtype=torch.bool)
        return TensorDict(
            {
                self.obs_key: torch.stack(obs),
                "action": torch.stack(act),
                "done": false,
                "terminated": false,
                "truncated": false,
                "next": {
                    self.obs_key: torch.stack(nxt),
                    "reward": torch.stack(rew),
                    "done": term_t | trunc_t,
                    "terminated": term_t,
                    "truncated": trunc_t,
                },
                "collector": {"traj_ids": torch.tensor(traj, dtype=torch.long)},
            },
            batch_size=[size],
        )

    def expected(self, steps_written: int, capacity: int, n_step: int, gamma: float):
        """Oracle: slot -> expected transition, for every valid slot; and all valid slots."""
        layout = []  # absolute storage rows: (episode, frame index, is_final)
        written_len: dict[int, int] = {}
        for e, t in self.rows[:steps_written]:
            layout.append((e, t, False))
            written_len[e] = t + 1
            ep = self.episodes[e]
            if t == ep.length - 1 and ep.ends:
                layout.append((e, t + 1, True))
        total = len(layout)
        oldest = max(total - capacity, 0)
        out = {}
        self.cut_by_ring = 0
        for p in range(oldest, total):
            e, t, final = layout[p]
            ep = self.episodes[e]
            ended = ep.ends and written_len[e] == ep.length
            last_frame = ep.length if ended else written_len[e] - 1
            n = min(n_step, last_frame - t)
            if final or n < 1:
                continue
            if p - (t - max(t - self.stack + 1, 0)) < oldest:  # stack reaches lost rows
                self.cut_by_ring += 1
                continue
            terminated = ended and ep.end == "terminated" and t + n == ep.length
            out[p % capacity] = {
                "obs": self.stack_at(e, t),
                "next_obs": self.stack_at(e, t + n),
                "reward": sum(gamma**k * self.reward(e, t + k) for k in range(n)),
                "discount": gamma**n * (not terminated),
                "terminated": terminated,
                "n": n,
                "action": torch.tensor([float(e), float(t)]),
                "age": total - p,
            }
        return out


def _feed(rb: NStepReplayBuffer, fake: FakeCollector, chunks: list[int], upto: int) -> int:
    first = 0
    for size in chunks[:upto]:
        rb.extend(fake.batch(first, first + size))
        first += size
    return first


def _check_against_oracle(rb: NStepReplayBuffer, fake: FakeCollector, steps: int) -> int:
    expected = fake.expected(steps, rb.capacity, rb.n_step, rb.gamma)
    slots = torch.arange(len(rb))
    valid = rb.valid_mask(slots)
    assert sorted(slots[valid].tolist()) == sorted(expected), "valid slots differ"
    index = torch.tensor(sorted(expected), dtype=torch.long)
    got = rb.gather(index)
    key = rb.obs_key
    for i, slot in enumerate(index.tolist()):
        want = expected[slot]
        assert torch.equal(got[key][i], want["obs"]), f"obs stack at slot {slot}"
        assert torch.equal(got["next", key][i], want["next_obs"]), f"next stack at slot {slot}"
        assert got["next", "reward"][i, 0].item() == pytest.approx(want["reward"], rel=1e-6)
        assert got["next", "discount"][i, 0].item() == pytest.approx(want["discount"], rel=1e-6)
        assert got["next", "terminated"][i, 0].item() == want["terminated"]
        assert got["next", "n_steps"][i, 0].item() == want["n"]
        assert torch.equal(got["action"][i, :2], want["action"])
        assert got["age"][i].item() == want["age"]
    return len(expected)


# ------------------------------------------------------------------------ n-step buffer
def test_nstep_targets_by_hand() -> None:
    g = 0.9
    episodes = [Episode(5, "terminated"), Episode(4, "truncated"), Episode(6, None)]
    fake = FakeCollector(episodes, "pixels", 3, (3, 2, 2))
    rb = make_replay_buffer(100, n_step=3, gamma=g, frame_stack=3)
    rb.extend(fake.batch(0, 3))
    rb.extend(fake.batch(3, 9).unsqueeze(0))  # [1, T] batches are accepted too
    rb.extend(fake.batch(9, 13))  # episode 2: 4 of its steps so far
    # rows: ep0 steps 0-4 = slots 0-4, final frame 5; ep1 steps 6-9, final 10; ep2 11-14
    assert len(rb) == 15

    def one(slot: int) -> TensorDict:
        return rb.gather(torch.tensor([slot]))[0]

    def frames(td: TensorDict, key) -> list[int]:
        return [int(v) for v in td[key][::3, 0, 0]]  # one value per stacked frame

    v = fake.value
    s = one(0)  # ep0 t=0: full 3-step window
    assert s["next", "reward"].item() == pytest.approx(1 + g * 2 + g**2 * 3)
    assert s["next", "discount"].item() == pytest.approx(g**3)
    assert frames(s, "pixels") == [v[0, 0]] * 3
    assert frames(s, ("next", "pixels")) == [v[0, 1], v[0, 2], v[0, 3]]
    s = one(3)  # ep0 t=3: 2 steps to the termination, no bootstrap
    assert s["next", "reward"].item() == pytest.approx(4 + g * 5)
    assert s["next", "discount"].item() == 0.0 and bool(s["next", "terminated"])
    assert frames(s, ("next", "pixels")) == [v[0, 3], v[0, 4], v[0, 5]]  # final frame row
    s = one(4)
    assert s["next", "reward"].item() == pytest.approx(5) and s["next", "discount"].item() == 0
    s = one(7)  # ep1 t=1: stack clamped at the reset
    assert frames(s, "pixels") == [v[1, 0], v[1, 0], v[1, 1]]
    s = one(8)  # ep1 t=2: 2 steps to the time limit, which bootstraps
    assert s["next", "reward"].item() == pytest.approx(13 + g * 14)
    assert s["next", "discount"].item() == pytest.approx(g**2)
    assert not bool(s["next", "terminated"])
    assert frames(s, ("next", "pixels")) == [v[1, 2], v[1, 3], v[1, 4]]
    s = one(11)  # ep2 t=0 at the head: enough steps written
    assert s["next", "reward"].item() == pytest.approx(21 + g * 22 + g**2 * 23)
    s = one(12)  # ep2 t=1: 2 steps written after it -> bootstraps from the newest frame
    assert s["next", "reward"].item() == pytest.approx(22 + g * 23)
    assert s["next", "discount"].item() == pytest.approx(g**2)
    assert frames(s, ("next", "pixels")) == [v[2, 1], v[2, 2], v[2, 3]]
    valid = rb.valid_mask(torch.arange(15)).tolist()
    assert valid == [True] * 5 + [False] + [True] * 4 + [False] + [True] * 3 + [False]
    rb.extend(fake.batch(13, 15))  # ep2 continues in the next batch
    s = one(12)
    assert s["next", "reward"].item() == pytest.approx(22 + g * 23 + g**2 * 24)
    assert s["next", "discount"].item() == pytest.approx(g**3)
    assert frames(one(14), "pixels") == [v[2, 1], v[2, 2], v[2, 3]]
    assert rb.valid_mask(torch.tensor([14, 15, 16])).tolist() == [True, True, False]


RUN = [
    Episode(7, "terminated"),
    Episode(5, "truncated"),
    Episode(9, "truncated"),
    Episode(3, "terminated"),
    Episode(1, "terminated"),
    Episode(8, None),
]
CHUNKS = [4, 6, 1, 9, 7, 6]  # 33 steps + 5 final rows = 38 rows through a 16-row ring


@pytest.mark.parametrize(
    "obs_key,stack,shape",
    [("pixels", 3, (3, 2, 2)), ("observation", 1, (4,)), ("observation", 2, (3,))],
    ids=["pixels", "state", "state-stack2"],
)
def test_stacks_and_targets_after_wrap(obs_key: str, stack: int, shape: tuple) -> None:
    fake = FakeCollector(RUN, obs_key, stack, shape)
    rb = make_replay_buffer(16, obs_key=obs_key, frame_stack=stack, n_step=3, gamma=0.97)
    checked, steps, cut = 0, 0, 0
    for size in CHUNKS:
        rb.extend(fake.batch(steps, steps + size))
        steps += size
        checked += _check_against_oracle(rb, fake, steps)
        cut += fake.cut_by_ring
    assert rb.write_count == 38 and len(rb) == 16 and checked > 40
    if stack > 1:  # the run does exercise rows whose stack reaches overwritten rows
        assert cut > 0


def test_long_and_abandoned_episodes() -> None:
    # Episode 0 outlasts the 8-row ring and is abandoned inside a batch (traj id change,
    # no done), episode 1 is abandoned at a batch boundary; empty slots follow the head
    # at first. Checked against the oracle after every batch.
    run = [
        Episode(20, "abandoned"),
        Episode(4, "abandoned"),
        Episode(3, "terminated"),
        Episode(6, None),
    ]
    fake = FakeCollector(run, "pixels", 3, (3, 2, 2))
    rb = make_replay_buffer(8, n_step=3, gamma=0.9)
    steps = 0
    for size in [3, 3, 3, 3, 3, 3, 3, 3, 4, 5]:
        rb.extend(fake.batch(steps, steps + size))
        steps += size
        _check_against_oracle(rb, fake, steps)
    assert steps == 33 and rb.write_count == 34


def test_sample_returns_valid_transitions() -> None:
    fake = FakeCollector(RUN, "pixels", 3, (3, 2, 2))
    for sampler in ("proximal", "reference", "uniform"):
        rb = make_replay_buffer(
            16, n_step=3, gamma=0.97, sampler=sampler, transitions_per_episode=8
        )
        steps = _feed(rb, fake, CHUNKS, len(CHUNKS))
        expected = fake.expected(steps, 16, 3, 0.97)
        torch.manual_seed(6)
        batch = rb.sample(2_000)
        assert batch.shape == (2_000,)
        assert set(batch["index"].tolist()) <= set(expected), sampler
        assert len(set(batch["index"].tolist())) == len(expected)  # all valid ones reachable
        again = rb.gather(batch["index"][:50])
        assert (again == batch[:50]).all()


def test_pixel_bytes_per_transition() -> None:
    for action_dim in (6, 38):  # cheetah, dog
        episodes = [Episode(3, "terminated"), Episode(2, None)]
        fake = FakeCollector(episodes, "pixels", 3, (3, 84, 84), action_dim=action_dim)
        rb = make_replay_buffer(8)
        rb.extend(fake.batch(0, 5))
        storage = rb.storage._storage
        assert storage["frame"].shape == (8, 3, 84, 84) and storage["frame"].dtype == torch.uint8
        per_row = sum(t[0].numel() * t.element_size() for t in storage.values(True, True))
        assert per_row <= 21_500, per_row


@pytest.mark.parametrize("storage", ["memory", "memmap"])
@pytest.mark.parametrize("sampler", ["proximal", "reference"])
def test_buffer_checkpoint_round_trip(storage: str, sampler: str, tmp_path) -> None:
    fake = FakeCollector(RUN, "pixels", 3, (3, 2, 2))

    def build(name: str) -> NStepReplayBuffer:
        return make_replay_buffer(
            16,
            sampler=sampler,
            storage=storage,
            gamma=0.97,
            transitions_per_episode=8,
            scratch_dir=tmp_path / name,
        )

    rb = build("a")
    steps = _feed(rb, fake, CHUNKS, 5)
    rb.sample(8)
    rb.dumps(tmp_path / "ckpt")
    loaded = build("b")
    loaded.loads(tmp_path / "ckpt")
    restored = build("c")
    restored.load_state_dict(rb.state_dict())
    for step in range(2):
        batches = []
        for buf in (rb, loaded, restored):
            torch.manual_seed(7)
            batches.append(buf.sample(256))
        assert (batches[0] == batches[1]).all() and (batches[0] == batches[2]).all()
        if step == 0:  # the episode left open continues in all three
            for buf in (rb, loaded, restored):
                buf.extend(fake.batch(steps, steps + CHUNKS[5]))
    assert _check_against_oracle(loaded, fake, steps + CHUNKS[5]) > 0


def test_generator_stream_survives_checkpoint(tmp_path) -> None:
    fake = FakeCollector(RUN, "pixels", 3, (3, 2, 2))
    buffers = []
    for _ in range(2):
        rb = make_replay_buffer(16, gamma=0.97, generator=torch.Generator().manual_seed(8))
        _feed(rb, fake, CHUNKS, len(CHUNKS))
        buffers.append(rb)
    first, second = buffers
    assert (first.sample(64) == second.sample(64)).all()  # independent of the global RNG
    first.dumps(tmp_path / "ckpt")
    loaded = make_replay_buffer(16, gamma=0.97, generator=torch.Generator().manual_seed(9))
    loaded.loads(tmp_path / "ckpt")  # restores the generator's state too
    assert (first.sample(64) == loaded.sample(64)).all()


def test_buffer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="proximal"):
        make_replay_buffer(10, sampler="per")
    with pytest.raises(ValueError, match="memmap"):
        make_replay_buffer(10, storage="disk")
    rb = make_replay_buffer(10)
    fake = FakeCollector([Episode(3, None)], "pixels", 3, (3, 2, 2))
    with pytest.raises(ValueError, match="single-environment"):
        rb.extend(fake.batch(0, 2).unsqueeze(0).expand(2, 2))


def test_unwritten_rows_never_leak_into_targets() -> None:
    # LazyTensorStorage allocates with torch.empty: slots past the head hold arbitrary bits,
    # NaN included. Head-of-buffer targets must not read them (NaN * 0 is NaN).
    fake = FakeCollector([Episode(6, None)], "observation", 1, (3,))
    rb = make_replay_buffer(16, obs_key="observation", frame_stack=1, n_step=3, gamma=0.9)
    rb.extend(fake.batch(0, 4))
    storage = rb.storage._storage
    storage["reward"][4:] = float("nan")
    storage["action"][4:] = float("nan")
    valid = torch.arange(16)[rb.valid_mask(torch.arange(16))]
    assert valid.tolist() == [0, 1, 2]
    batch = rb.gather(valid)
    assert torch.isfinite(batch["next", "reward"]).all()
    # row 2's target uses the one step written after it: r_2 + 0.9 r_3... only r_2 (n'=1)
    assert batch["next", "n_steps"].reshape(-1).tolist() == [3, 2, 1]
    assert batch["next", "reward"][2].item() == pytest.approx(fake.reward(0, 2))


@pytest.mark.parametrize(("task", "assumed"), [("cheetah_run", 1000), ("mw_assembly", 500)])
def test_reference_sampler_assumes_the_tasks_episode_env_steps(task: str, assumed: int,
                                                               tmp_path) -> None:
    """``replay.sampler=reference`` assumes an episode's environment steps as its length,
    as the reference code does (1000 on DMC, 500 on Meta-World)."""
    from hydra import compose, initialize_config_dir

    from cp3er.builders import make_buffer
    from cp3er.config_schema import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[f"task={task}", "obs=state",
                                                       "replay.sampler=reference",
                                                       "replay.capacity=100"])
    sampler = make_buffer(cfg, tmp_path).sampler
    assert sampler.mode == "reference"
    assert sampler.weighting.transitions_per_episode == assumed


def _state_rows(first: int, count: int, episode: int = 100) -> TensorDict:
    steps = torch.arange(first, first + count)
    done = (steps % episode == episode - 1).unsqueeze(-1)
    gen = torch.Generator().manual_seed(first)
    return TensorDict({
        "observation": torch.randn(count, 5, generator=gen),
        "action": torch.rand(count, 2, generator=gen),
        "collector": {"traj_ids": steps // episode},
        "next": {"observation": torch.randn(count, 5, generator=gen),
                 "reward": torch.rand(count, 1, generator=gen), "done": done,
                 "terminated": torch.zeros_like(done), "truncated": done.clone()},
    }, [count])


def test_extend_reports_the_episode_ends_it_found() -> None:
    """The batch's episode ends, found once by the buffer (the trainer's train rows read
    them): one buffer ``[T]``, streams ``[workers, T]``."""
    batch = _state_rows(0, 250)
    rb = make_replay_buffer(1000, obs_key="observation", frame_stack=1)
    rb.extend(batch)
    assert torch.equal(rb.episode_ends, batch["next", "done"].reshape(-1))
    streams = make_replay_buffer(1000, streams=2, obs_key="observation", frame_stack=1)
    stacked = torch.stack([batch, _state_rows(7, 250)])
    streams.extend(stacked)
    assert torch.equal(streams.episode_ends, stacked["next", "done"].reshape(2, 250))


def _storage_bytes(folder) -> int:
    return sum(p.stat().st_size for p in (folder / "storage").glob("*.memmap"))


@pytest.mark.parametrize("storage", ["memory", "memmap"])
def test_checkpoint_size_grows_with_the_filled_rows_not_the_capacity(storage: str,
                                                                     tmp_path) -> None:
    """A buffer of capacity 5,000 holding 100 and then 400 rows dumps 100 and 400 rows'
    bytes (not all 5,000 rows); the loaded buffer samples exactly as the original."""
    def build(name: str) -> NStepReplayBuffer:
        return make_replay_buffer(5000, obs_key="observation", frame_stack=1, batch_size=32,
                                  storage=storage, scratch_dir=tmp_path / name)

    rb = build("a")
    rb.extend(_state_rows(0, 100))
    rb.dumps(tmp_path / "small")
    rb.extend(_state_rows(100, 300))
    rb.dumps(tmp_path / "large")
    rows_small, rows_large = (json.loads((tmp_path / f / "storage" / "storage_metadata.json")
                                         .read_text())["len"] for f in ("small", "large"))
    per_row = sum(t[0].numel() * t.element_size()
                  for t in rb.storage._storage.values(True, True))
    assert _storage_bytes(tmp_path / "small") == rows_small * per_row
    assert _storage_bytes(tmp_path / "large") == rows_large * per_row
    assert 100 <= rows_small <= 110 and 400 <= rows_large <= 410  # (+ episode-end frames)
    assert rb.dump_nbytes() - (1 << 20) == rows_large * per_row

    loaded = build("load")
    loaded.loads(tmp_path / "large")
    torch.manual_seed(3)
    expected = rb.sample()
    torch.manual_seed(3)
    assert (loaded.sample() == expected).all()


# ---------------------------------------------------------------------- storage device
#: Batches sampled by the code before ``replay.device`` existed (commit e0f1db3: storage on
#: the CPU, the batch moved at the end); rewrite with ``python tests/test_replay.py`` run
#: against the code to record (``PYTHONPATH=<its checkout>``).
GOLDEN_BATCHES = Path(__file__).parent / "data" / "replay_batches_e0f1db3.pt"
#: name: (obs_key, frame_stack, frame shape, sampler); each writes RUN through a 16-row ring
DEVICE_CASES = {
    "pixels-proximal": ("pixels", 3, (3, 2, 2), "proximal"),
    "pixels-reference": ("pixels", 3, (3, 2, 2), "reference"),
    "state-uniform": ("observation", 1, (4,), "uniform"),
}


class _RoundingRewards(FakeCollector):
    """Rewards that float arithmetic rounds (pi / (t + 3)), so that the n-step sums test
    the order and precision of the arithmetic bit for bit."""

    def reward(self, e: int, t: int) -> float:
        return math.pi * (e + 1) / (t + 3)


def _device_buffer(name: str, **buffer_kwargs) -> NStepReplayBuffer:
    """An empty 16-row buffer of the case, sampling from a generator seeded alike for every
    buffer unless ``generator`` is given (``None``: the global RNG)."""
    obs_key, stack, _, sampler = DEVICE_CASES[name]
    kwargs = {"generator": torch.Generator().manual_seed(12), **buffer_kwargs}
    return make_replay_buffer(16, obs_key=obs_key, frame_stack=stack, gamma=0.97,
                              sampler=sampler, transitions_per_episode=8, **kwargs)


def _device_case(name: str, **buffer_kwargs) -> tuple[NStepReplayBuffer, list[TensorDict]]:
    """A buffer of the case (:func:`_device_buffer`) fed RUN in CHUNKS (wrapping its ring
    twice) and the batches of 32 it sampled after each chunk."""
    obs_key, stack, shape, _ = DEVICE_CASES[name]
    fake = _RoundingRewards(RUN, obs_key, stack, shape)
    rb = _device_buffer(name, **buffer_kwargs)
    batches, steps = [], 0
    for size in CHUNKS:
        rb.extend(fake.batch(steps, steps + size))
        steps += size
        batches.append(rb.sample(32))
    return rb, batches


def _flat(batch: TensorDict) -> dict[str, torch.Tensor]:
    """A batch's tensors by flattened key ("next.reward"), on the CPU."""
    return dict(batch.cpu().flatten_keys(".").items())


def test_cpu_storage_batches_are_bit_identical_to_before_replay_device() -> None:
    """The CPU path after ``replay.device`` samples exactly the batches it sampled before
    (GOLDEN_BATCHES): same slots, stacks, n-step sums, dtypes, every key."""
    golden = torch.load(GOLDEN_BATCHES, weights_only=True)
    assert set(golden) == set(DEVICE_CASES)
    for name in DEVICE_CASES:
        _, batches = _device_case(name, storage_device="cpu")
        assert len(batches) == len(golden[name]) == len(CHUNKS)
        for i, (want, batch) in enumerate(zip(golden[name], batches, strict=True)):
            got = _flat(batch)
            assert sorted(got) == sorted(want), (name, i)
            for key, value in want.items():
                assert got[key].dtype == value.dtype, (name, i, key)
                assert torch.equal(got[key], value), (name, i, key)



def _assert_same_transitions(want: TensorDict, got: TensorDict) -> None:
    """Every key equal, the float64 n-step sums and discounts up to float32 rounding (a
    CUDA reduction may add in another order)."""
    want, got = _flat(want), _flat(got)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        if key in ("next.reward", "next.discount"):
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(got[key], value), key


def _on(batch: TensorDict, device: str) -> bool:
    return all(t.device.type == device for t in batch.values(True, True))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", DEVICE_CASES)
def test_cuda_storage_builds_the_cpu_storages_batches(name: str) -> None:
    """A CUDA storage holds the rows on the GPU and builds there the batches a CPU storage
    builds: the same slots from the same seeded (CPU) generator, and ``gather`` of the same
    slots."""
    cpu_rb, cpu_batches = _device_case(name, storage_device="cpu")
    cuda_rb, cuda_batches = _device_case(name, storage_device="cuda")
    assert all(t.device.type == "cuda" for t in cuda_rb.storage._storage.values(True, True))
    for want, got in zip(cpu_batches, cuda_batches, strict=True):
        assert _on(got, "cuda")
        _assert_same_transitions(want, got)
    slots = torch.arange(16)
    valid = cpu_rb.valid_mask(slots)
    assert torch.equal(cuda_rb.valid_mask(slots.cuda()).cpu(), valid)
    _assert_same_transitions(cpu_rb.gather(slots[valid]), cuda_rb.gather(slots[valid]))


@needs_cuda
@pytest.mark.parametrize("name", ["pixels-proximal", "pixels-reference"])
@pytest.mark.parametrize(("saved_on", "loaded_on"),
                         [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoints_move_between_storage_devices(name: str, saved_on: str, loaded_on: str,
                                                  tmp_path) -> None:
    """``dumps``/``loads`` and ``state_dict``/``load_state_dict`` restore a buffer onto the
    loading buffer's storage device, whatever the saving one's; sampling continues alike."""
    rb, _ = _device_case(name, generator=None, storage_device=saved_on)
    rb.dumps(tmp_path / "ckpt")
    state = rb.state_dict()
    torch.manual_seed(7)
    want = rb.sample(64)
    for restore in ("loads", "load_state_dict"):
        loaded = _device_buffer(name, generator=None, storage_device=loaded_on)
        if restore == "loads":
            loaded.loads(tmp_path / "ckpt")
        else:
            loaded.load_state_dict(state)
        assert loaded.write_count == rb.write_count, restore
        assert all(t.device.type == loaded_on
                   for t in loaded.storage._storage.values(True, True)), restore
        torch.manual_seed(7)
        got = loaded.sample(64)
        assert _on(got, loaded_on), restore
        _assert_same_transitions(want, got)


def test_storage_device_is_checked() -> None:
    with pytest.raises(ValueError, match=r"storage='memmap' lives on the CPU.*'cuda'"):
        make_replay_buffer(10, storage="memmap", storage_device="cuda")
    with pytest.raises(ValueError, match=r"one of \('cpu', 'cuda'\).*'meta'"):
        make_replay_buffer(10, storage_device="meta")
    rb = make_replay_buffer(10)
    assert rb.storage_device == rb.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            make_replay_buffer(10, storage_device="cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_make_buffer_puts_the_storage_on_replay_device(device: str, tmp_path) -> None:
    from hydra import compose, initialize_config_dir

    from cp3er.builders import make_buffer
    from cp3er.config_schema import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[
            "task=cartpole_balance", "obs=state", "replay.capacity=100", f"device={device}",
            f"replay.device={device}"])
    rb = make_buffer(cfg, tmp_path)
    assert rb.storage_device.type == rb.device.type == device
    _feed(rb, FakeCollector(RUN, "observation", 1, (5,)), CHUNKS, 2)
    assert _on(rb.sample(8), device)


if __name__ == "__main__":  # record GOLDEN_BATCHES with the cp3er on the path
    GOLDEN_BATCHES.parent.mkdir(exist_ok=True)
    torch.save({name: [_flat(b) for b in _device_case(name)[1]] for name in DEVICE_CASES},
               GOLDEN_BATCHES)
    print(f"wrote {GOLDEN_BATCHES}")
