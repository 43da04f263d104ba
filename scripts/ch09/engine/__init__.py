"""The training engine: what makes an update fast, on top of the labs' components.

| module                | what it holds                                                                        |
|-----------------------|--------------------------------------------------------------------------------------|
| ``framestack_replay`` | the frame-once HER replay buffer (each 84x84 frame stored once)                      |
| ``her_sampler``       | HER relabelling, the Fetch goal reward and DrQ's shift on the device                  |
| ``fast_sac``          | ``FastSAC``: SB3's SAC with the whole update as one step (a CUDA graph on CUDA)       |
| ``memory``            | where the replay's frames live and whether they fit (the memory plan)                 |
"""
