"""The run machinery behind ``scripts/ch09_pixel_push.py``: everything a multi-day run needs that is not the experiment.

The experiment itself (configs, ``build_agent``, ``train`` / ``eval`` / ``aggregate``) reads top to bottom in
``ch09_pixel_push.py``; the lab components (env, encoders, policy) live in ``scripts/labs/``.
"""
