"""`make run`: the default main job, sized for a CPU laptop.

Rolls out a pixel DMC task with uniform random actions and writes a GIF of the
observations the agent sees (the newest 84x84 frame of each stack) into ``runs/demo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from envs import make_env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="cheetah_run")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    env = make_env(args.task, "pixels", seed=0)
    start = time.perf_counter()
    rollout = env.rollout(args.steps, break_when_any_done=False)
    seconds = time.perf_counter() - start
    env.close()
    frames = rollout["pixels"][:, -3:].permute(0, 2, 3, 1).numpy().astype(np.uint8)
    iio.imwrite(out / "rollout.gif", frames, duration=40, loop=0)
    print(json.dumps({"task": args.task, "steps": args.steps, "gif": str(out / "rollout.gif"),
                      "return": rollout["next", "reward"].sum().item(),
                      "ms_per_step": 1000 * seconds / args.steps}))


if __name__ == "__main__":
    main()
