"""The installed project (pyproject.toml; docker/dev.sh runs ``pip install -e .``): checkpoints written before the
engine moved into ``ch09.engine`` still load with plain ``SAC.load`` in a process started outside the repository.

(That a current checkpoint loads and resumes there is ``test_fast_sac``'s plain-SB3 resume test.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile

from stable_baselines3 import SAC
from stable_baselines3.common.vec_env import DummyVecEnv

import ch09.framestack_replay  # noqa: F401  (the alias module must be importable for the old name to pickle)
from ch09.engine.framestack_replay import FrameStackHerReplayBuffer
from pixel_wrapper import make_fetch_env

OLD_MODULE = "ch09.framestack_replay"


def test_a_checkpoint_naming_the_old_replay_module_loads_from_outside_the_repository(tmp_path, monkeypatch):
    env = DummyVecEnv([lambda: make_fetch_env("FetchReach-v4", pixels=False, goal_mode="both")])
    try:
        model = SAC("MultiInputPolicy", env, buffer_size=1_000, batch_size=32, learning_starts=50, seed=0,
                    device="cpu", replay_buffer_class=FrameStackHerReplayBuffer,
                    replay_buffer_kwargs=dict(n_sampled_goal=4), policy_kwargs=dict(net_arch=[32, 32]))
        model.learn(100)
        # As a checkpoint written before the move names it: cloudpickle stores the class by module and name.
        monkeypatch.setattr(FrameStackHerReplayBuffer, "__module__", OLD_MODULE)
        model.save(tmp_path / "old.zip")
    finally:
        env.close()
    with zipfile.ZipFile(tmp_path / "old.zip") as archive:
        assert OLD_MODULE.encode() in archive.read("data")

    script = textwrap.dedent(f"""
        from pixel_wrapper import make_fetch_env
        from stable_baselines3 import SAC
        from stable_baselines3.common.vec_env import DummyVecEnv
        env = DummyVecEnv([lambda: make_fetch_env("FetchReach-v4", pixels=False, goal_mode="both")])
        model = SAC.load({str(tmp_path / 'old.zip')!r}, env=env, device="cpu")
        print(model.replay_buffer_class.__module__, model.num_timesteps)
        env.close()
    """)
    env_vars = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env_vars)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ch09.engine.framestack_replay", "100"], done.stdout
