"""The run machinery: everything a multi-day run needs that is not the experiment or the engine.

| module         | what it holds                                                                   |
|----------------|---------------------------------------------------------------------------------|
| ``artifacts``  | run paths, step labels, the one atomic-write helper, versions, git commit       |
| ``checkpoints``| the checkpointer, stop-on-signal, resume, loading a checkpoint back             |
| ``callbacks``  | progress bar, periodic evaluation, hyper-parameters, periodic checkpoints       |
| ``vec_env``    | env worker processes with a watchdog                                            |
| ``validation`` | one-sentence checks of flags, folders and devices                               |
| ``stats``      | Wilson and Student-t intervals (pure Python, no torch)                          |
| ``digest``     | SHA-256 of checkpoints, ``SHA256SUMS`` files, the one-sentence mismatch         |
| ``release``    | ``package`` (a release folder to publish), verified resumable downloads         |
| ``video``      | episode videos and TensorBoard's eval/video                                     |
"""
