"""The run machinery behind ``scripts/ch09_pixel_push.py``: everything a multi-day run needs that is not the experiment.

The experiment itself (configs, ``build_agent``, ``train`` / ``eval`` / ``aggregate``) reads top to bottom in
``ch09_pixel_push.py``; the lab components (env, encoders, policy) live in ``scripts/labs/``. Each module here
is small enough to read in one sitting:

| module                 | what it holds                                                                 |
|------------------------|-------------------------------------------------------------------------------|
| ``errors``             | ``UserError`` and the exit code of every mistake a user can fix               |
| ``artifacts``          | run paths, step labels, the one atomic-write helper, versions, git commit     |
| ``checkpoints``        | the checkpointer, stop-on-signal, resume, loading a checkpoint back           |
| ``callbacks``          | progress bar, periodic evaluation, hyper-parameters, periodic checkpoints     |
| ``vec_env``            | env worker processes with a watchdog                                          |
| ``memory``             | the replay-buffer memory preflight                                            |
| ``stats``              | Wilson and Student-t intervals (pure Python, no torch)                        |
| ``digest``             | SHA-256 of checkpoints, ``SHA256SUMS`` files, the one-sentence mismatch       |
| ``release``            | ``package`` (a release folder to publish), verified resumable downloads       |
| ``framestack_replay``  | the frame-once HER replay buffer                                              |

Modules here import each other as ``ch09.<module>`` and the labs by bare name; none of them edits ``sys.path``
(the entry scripts put ``scripts/labs`` on it, pytest does through ``pytest.ini``).
"""
