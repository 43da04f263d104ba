"""Where checkpoints written before the engine moved to ``ch09.engine`` look for their replay buffer class.

SB3 pickles ``replay_buffer_class`` by module and name (``ch09.framestack_replay.FrameStackHerReplayBuffer``);
this alias lets those checkpoints load unchanged. New code imports ``ch09.engine.framestack_replay``.
"""

from ch09.engine.framestack_replay import FrameStackHerReplayBuffer

__all__ = ["FrameStackHerReplayBuffer"]
