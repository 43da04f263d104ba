"""Sweeps: Reproduce It and the investigation as one command (``scripts/ch09_sweep.py``).

| module       | what it holds                                                             |
|--------------|---------------------------------------------------------------------------|
| ``plan``     | which runs a sweep means, and their ``ch09_pixel_push.py`` commands       |
| ``progress`` | the status board the runs report to                                       |
| ``launch``   | the Ray side: connect, place, run, retry (imported only when Ray is used) |
"""
