"""The code behind ``scripts/ch09_pixel_push.py``, in layers whose imports point one way (down):

| layer               | what it holds                                                         | may import        |
|---------------------|-----------------------------------------------------------------------|-------------------|
| ``scripts/labs``    | the chapter's components (env wrapper, encoders, DrQ, DrQv2SACPolicy) | labs              |
| ``ch09.errors``     | ``UserError``: the exit code of every mistake a user can fix (stdlib) | nothing           |
| ``ch09.engine``     | what trains fast: frame-once replay, device HER draw, ``FastSAC``     | labs, errors      |
| ``ch09.run``        | what a multi-day run needs: paths, checkpoints, sessions, results     | engine and below  |
| ``ch09.experiment`` | the chapter's experiment: ``TrainConfig``, ``build_agent``, the envs  | run and below     |
|  (``selftest``,     | the self-test, the speed measurement and the Reach probe, which build |                   |
|   ``benchmark``,    | or load its agents                                                    |                   |
|   ``probe``)        |                                                                       |                   |
| ``ch09.sweep``      | many runs as one command on Ray: the plan, progress board, launcher   | experiment, below |
| entry scripts       | ``scripts/*.py``: train/eval CLI, sweeps, benchmarks, figures         | all of the above  |

``tests/test_layers.py`` walks every import and fails on one that runs back up a layer or into an entry script.
The project installs (``pip install -e .``, done by ``docker/dev.sh``) the ``ch09`` package and the labs under
their bare module names, so a checkpoint that names ``drqv2_sac_policy.DrQv2SACPolicy`` loads in any process.
"""
