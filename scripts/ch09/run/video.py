"""Watch the agent: annotated episode videos for ``eval --video``, ``eval/video`` in TensorBoard and the figure.

| piece              | what it does                                                                          |
|--------------------|---------------------------------------------------------------------------------------|
| ``CameraView``     | the env's own camera, rendered a second time at 480x480 WITH the goal marker          |
| ``EpisodeRecorder``| a wrapper that keeps, for the episodes it is asked to record, the camera view, the    |
|                    | newest observation frame, the distance to the goal and success, step by step          |
| ``compose_frame``  | one video frame: camera view beside the 84x84 observation (upscaled x5, no smoothing) |
| ``write_video``    | MP4 (H.264 through imageio-ffmpeg) or GIF (imageio's Pillow plugin), written atomically|
| ``log_tensorboard_video`` | one episode as an animated GIF image summary under ``eval/video``              |

Recording never changes an episode. The camera view is rendered from a private copy of the simulator
state (``mj_copyData``), so the env's ``MjData`` is never written; the goal marker is shown only for that
render (its alpha and position are restored right after), so the observation keeps it hidden; no random
number generator is drawn from. The same seeds give the same episodes with and without a video.

Why not SB3's ``Video`` logger value: it goes through ``torch.utils.tensorboard``'s ``add_video``, which
needs moviepy 1.x (moviepy 2 removed the ``moviepy.editor`` module it imports); without it, it prints a
warning and logs nothing. We encode the GIF with imageio (already a dependency) and write the same kind of
summary ``add_video`` writes: an image summary holding an animated GIF, shown in TensorBoard's IMAGES tab.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ch09.run.artifacts import atomic_replace
from lab_support import renderer_start_warnings
from pixel_wrapper import (  # imports lab_support first: MUJOCO_GL and the mujoco pin guard, before mujoco loads
    GOAL_MARKER_SITE,
    PIXEL_KEY,
    SUCCESS_DISTANCE,
    RendererUnavailableError,
)

VideoFormat = Literal["mp4", "gif"]

CAMERA_SIZE = 480
"""Side of the camera view in ``eval --video`` files and the rollout figure: MuJoCo's default Fetch size."""
TENSORBOARD_CAMERA_SIZE = 256
"""Side of the camera view in TensorBoard's ``eval/video``: smaller, so each evaluation adds less to the
event file and to the run's time (the README's table says how much)."""
VIDEO_FPS = 10
"""Frames per second of the videos: slower than the simulator's 25 steps/s, so each step can be followed."""
MP4_QUALITY = 7
"""imageio-ffmpeg's 0-10 quality scale (7: H.264 CRF 15), high enough that the 84x84 pixels stay sharp."""
HEADER_HEIGHT = 32
"""Pixels of the text line above the panels (480 + 32 = 512: both sides of an MP4 frame stay multiples of 16)."""
FONT_SIZE = 16
CAPTION_FONT_SIZE = 13
GOAL_MARKER_ALPHA = 1.0
"""The goal sphere's alpha in Fetch's XML; the pixel wrapper sets it to 0 in the env's model."""
SUCCESS_COLOUR, FAILURE_COLOUR, TEXT_COLOUR = (60, 200, 90), (235, 90, 80), (235, 235, 235)
BACKGROUND = (24, 24, 24)


# ---------------------------------------------------------------------------------------------------------
# The camera view with the goal marker shown
# ---------------------------------------------------------------------------------------------------------
def fetch_camera(env: gym.Env) -> Any:
    """The free camera Gymnasium's renderer sets up for this env (Fetch: distance 2.5, azimuth 132, ...)."""
    import mujoco

    camera = mujoco.MjvCamera()
    camera.type = mujoco.mjtCamera.mjCAMERA_FREE
    camera.fixedcamid = -1
    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    for key, value in (getattr(renderer, "default_cam_config", None) or {}).items():
        if isinstance(value, np.ndarray):
            getattr(camera, key)[:] = value
        else:
            setattr(camera, key, value)
    return camera


class CameraView:
    """The env's camera rendered again, at ``size`` x ``size`` and with the goal marker visible.

    The render reads a private copy of the simulator state, and the marker is shown only around it:

    | step                                    | touches                                  |
    |-----------------------------------------|------------------------------------------|
    | ``mj_copyData(scratch, model, data)``   | writes the copy only                     |
    | marker at the goal, alpha 1             | ``model.site_pos/site_rgba``, restored   |
    | ``mj_forward(model, scratch)``, render  | the copy and this view's own GL context  |

    Rendered at 84x84 with the marker hidden, this view equals the observation's newest frame pixel for
    pixel (tests/test_video.py checks it): it is the same camera, only larger.
    """

    def __init__(self, env: gym.Env, size: int = CAMERA_SIZE) -> None:
        import mujoco

        fetch: Any = env.unwrapped  # a MujocoRobotEnv: model and data are its own attributes
        self.model, self.data, self.size = fetch.model, fetch.data, size
        self.scratch = mujoco.MjData(self.model)
        self.camera = fetch_camera(env)
        self.marker_site = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, GOAL_MARKER_SITE)
        # MuJoCo sizes an off-screen buffer from the model's offwidth/offheight, which Gymnasium set to the
        # env's render size (84 for a pixel env): raise them while this view's buffer is made, then restore.
        visual = self.model.vis.global_
        saved = (visual.offwidth, visual.offheight)
        visual.offwidth, visual.offheight = max(saved[0], size), max(saved[1], size)
        try:
            with renderer_start_warnings():
                self.renderer = mujoco.Renderer(self.model, size, size)
        except Exception as exc:  # no EGL / wrong MUJOCO_GL: the lab's one sentence says what to do
            raise RendererUnavailableError.from_exception(exc) from None
        finally:
            visual.offwidth, visual.offheight = saved

    def render(self, goal: np.ndarray, show_goal_marker: bool = True) -> np.ndarray:
        """The current scene as ``(size, size, 3)`` uint8, the goal marker at ``goal`` (metres, world frame)."""
        import mujoco

        mujoco.mj_copyData(self.scratch, self.model, self.data)
        site = self.marker_site
        saved_pos, saved_alpha = self.model.site_pos[site].copy(), float(self.model.site_rgba[site, 3])
        try:
            # Fetch's render callback does the same: place the site so that its world position is the goal
            # (the env only does it when it renders; a full-state env never does).
            mujoco.mj_kinematics(self.model, self.scratch)
            offset = self.scratch.site_xpos[site] - self.model.site_pos[site]
            self.model.site_pos[site] = np.asarray(goal, dtype=np.float64) - offset
            if show_goal_marker:
                self.model.site_rgba[site, 3] = GOAL_MARKER_ALPHA
            mujoco.mj_forward(self.model, self.scratch)
            self.renderer.update_scene(self.scratch, self.camera)
            return self.renderer.render().copy()
        finally:
            self.model.site_pos[site] = saved_pos
            self.model.site_rgba[site, 3] = saved_alpha

    def close(self) -> None:
        self.renderer.close()


# ---------------------------------------------------------------------------------------------------------
# Recording episodes
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RecordedEpisode:
    """One episode as recorded: frame 0 is the reset, frame t the state after step t (length + 1 frames)."""

    episode: int
    """Index of the episode among those this recorder's env ran (0 = the first reset)."""
    camera: list[np.ndarray] = field(default_factory=list)
    """``(S, S, 3)`` uint8 camera views, goal marker shown."""
    observation: list[np.ndarray] | None = field(default_factory=list)
    """``(84, 84, 3)`` uint8: the newest frame of the stack the policy received; None for a full-state env."""
    distance: list[float] = field(default_factory=list)
    """Distance from the achieved goal (the puck) to the goal, metres."""
    success: list[bool] = field(default_factory=list)
    max_steps: int | None = None
    """The env's step limit (50 for Fetch), shown as ``step t/50``."""

    @property
    def n_frames(self) -> int:
        return len(self.camera)

    @property
    def length(self) -> int:
        return self.n_frames - 1

    def frames(self, title: str = "") -> Iterator[np.ndarray]:
        """The composed video frames, one at a time (an encoder can stream them)."""
        for t in range(self.n_frames):
            observation = None if self.observation is None else self.observation[t]
            yield compose_frame(self.camera[t], observation, t, self.max_steps, self.distance[t],
                                self.success[t], title)


class EpisodeRecorder(gym.Wrapper):
    """Records the episodes it is asked to (``record_next``); passes everything else through unchanged.

    Sits outside every other wrapper (and inside a ``DummyVecEnv``, which resets an env the moment its
    episode ends: only a wrapper sees the last frame). ``on_episode`` receives each finished episode (to
    write it to disk at once, so memory holds one episode at a time); without it they pile up for ``take()``.
    """

    def __init__(self, env: gym.Env, camera_size: int = CAMERA_SIZE,
                 on_episode: Callable[[RecordedEpisode], None] | None = None) -> None:
        super().__init__(env)
        goal_keys = {"achieved_goal", "desired_goal"}
        spaces_ = getattr(env.observation_space, "spaces", {})
        if not goal_keys <= set(spaces_):
            raise ValueError(f"EpisodeRecorder needs achieved_goal and desired_goal in the observations, got "
                             f"{list(spaces_)}; build the env with goal_mode='both' (or full state).")
        self.camera_size, self.on_episode = camera_size, on_episode
        self.has_pixels = PIXEL_KEY in spaces_
        self.max_steps = env.spec.max_episode_steps if env.spec is not None else None
        self.view: CameraView | None = None  # made on the first recorded frame: a GL context costs time
        self.pending = 0
        self.episodes_started = 0
        self.current: RecordedEpisode | None = None
        self.finished: list[RecordedEpisode] = []
        self.seconds = 0.0
        """Wall time spent recording (camera renders and copies), so the cost can be reported."""

    def record_next(self, n_episodes: int = 1) -> None:
        """Record the next ``n_episodes`` episodes, starting with the next reset."""
        self.pending += n_episodes

    def take(self) -> list[RecordedEpisode]:
        """The episodes finished since the last call (those not handed to ``on_episode``)."""
        finished, self.finished = self.finished, []
        return finished

    def _add_frame(self, obs: dict[str, np.ndarray], success: bool | None) -> None:
        start = time.perf_counter()
        if self.view is None:
            self.view = CameraView(self.env, self.camera_size)
        episode = self.current
        assert episode is not None, "frames are added only while an episode is recorded"
        achieved, goal = np.asarray(obs["achieved_goal"]), np.asarray(obs["desired_goal"])
        distance = float(np.linalg.norm(achieved - goal))
        episode.camera.append(self.view.render(goal))
        if episode.observation is not None:
            episode.observation.append(np.asarray(obs[PIXEL_KEY][-3:]).transpose(1, 2, 0).copy())
        episode.distance.append(distance)
        # Fetch's is_success is exactly this test; a reset's info carries none.
        episode.success.append(bool(success) if success is not None else distance < SUCCESS_DISTANCE)
        self.seconds += time.perf_counter() - start

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self.current = None  # an episode cut short by a reset is dropped
        if self.pending > 0:
            self.pending -= 1
            self.current = RecordedEpisode(self.episodes_started, observation=[] if self.has_pixels else None,
                                           max_steps=self.max_steps)
            self._add_frame(obs, info.get("is_success"))
        self.episodes_started += 1
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.current is not None:
            self._add_frame(obs, info.get("is_success"))
            if terminated or truncated:
                episode, self.current = self.current, None
                if self.on_episode is not None:
                    self.on_episode(episode)
                else:
                    self.finished.append(episode)
        return obs, float(reward), terminated, truncated, info

    def close(self) -> None:
        if self.view is not None:
            self.view.close()  # its own GL context, before the env frees its own
            self.view = None
        super().close()


# ---------------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------------
def _font(size: int) -> Any:
    return ImageFont.load_default(size=size)


def _caption(draw: ImageDraw.ImageDraw, x: int, bottom: int, max_width: int, texts: Sequence[str]) -> None:
    """The first of ``texts`` that fits ``max_width``, on a dark box at the bottom-left of a panel."""
    font = _font(CAPTION_FONT_SIZE)
    fitting = [text for text in texts if draw.textlength(text, font=font) + 20 <= max_width]
    if not fitting:
        return
    origin = (x + 6, bottom - CAPTION_FONT_SIZE - 8)
    left, top, right, lower = draw.textbbox(origin, fitting[0], font=font)
    draw.rectangle((left - 4, top - 3, right + 4, lower + 3), fill=(0, 0, 0))
    draw.text(origin, fitting[0], fill=TEXT_COLOUR, font=font)


def compose_frame(camera: np.ndarray, observation: np.ndarray | None, step: int, max_steps: int | None,
                  distance: float, success: bool, title: str = "") -> np.ndarray:
    """One video frame, ``(HEADER_HEIGHT + S, 2 S, 3)`` uint8 (``(HEADER_HEIGHT + S, S, 3)`` without pixels).

    | region          | content                                                                  |
    |-----------------|--------------------------------------------------------------------------|
    | header          | step t/50, distance to goal (m), success; the title on the right          |
    | left panel      | the camera view, S x S, goal marker shown                                 |
    | right panel     | the 84x84 observation upscaled by S // 84 without smoothing, centred      |

    A full-state run has no observation image: the frame is the camera view only, and says so.
    """
    size = camera.shape[0]
    width = 2 * size if observation is not None else size
    canvas = Image.new("RGB", (width, HEADER_HEIGHT + size), BACKGROUND)
    canvas.paste(Image.fromarray(camera), (0, HEADER_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    if observation is not None:
        scale = max(size // observation.shape[0], 1)
        side = scale * observation.shape[0]
        upscaled = Image.fromarray(observation).resize((side, side), Image.Resampling.NEAREST)
        offset = (size - side) // 2
        canvas.paste(upscaled, (size + offset, HEADER_HEIGHT + offset))
        pixels = f"{observation.shape[0]}x{observation.shape[1]} (x{scale})"
        _caption(draw, size, HEADER_HEIGHT + size, size, (f"policy input: newest stacked frame, {pixels}, goal hidden",
                                                          f"policy input {pixels}, goal hidden", "policy input"))
        _caption(draw, 0, HEADER_HEIGHT + size, size, (f"camera {size}x{size}, goal marker shown", "camera"))
    else:
        _caption(draw, 0, HEADER_HEIGHT + size, size, ("full-state run: the policy reads the state, no image",
                                                       "full state: no image"))

    font = _font(FONT_SIZE)
    y = (HEADER_HEIGHT - FONT_SIZE) // 2 - 1
    x = 8
    for text, colour in ((f"step {step}" + (f"/{max_steps}" if max_steps else ""), TEXT_COLOUR),
                         (f"distance to goal {distance:.3f} m", TEXT_COLOUR),
                         ("success" if success else "no success", SUCCESS_COLOUR if success else FAILURE_COLOUR)):
        draw.text((x, y), text, fill=colour, font=font)
        x += int(draw.textlength(text, font=font)) + 18
    if title:
        title_width = int(draw.textlength(title, font=font))
        if x + title_width + 8 <= width:  # only when it fits beside the status
            draw.text((width - title_width - 8, y), title, fill=(170, 170, 170), font=font)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------------------
# Files and TensorBoard
# ---------------------------------------------------------------------------------------------------------
def encode_gif(frames: Iterable[np.ndarray], fps: int = VIDEO_FPS) -> bytes:
    """An animated GIF of ``frames`` (each ``(H, W, 3)`` uint8), looping, as bytes."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", np.stack(list(frames)), extension=".gif", duration=1000 / fps, loop=0)


def write_video(path: Path, frames: Iterable[np.ndarray], video_format: VideoFormat = "mp4",
                fps: int = VIDEO_FPS) -> int:
    """Write ``frames`` to ``path`` as MP4 (H.264, yuv420p: plays in browsers) or GIF; returns the count.

    Atomic (``atomic_replace``): a crash or a full disk never leaves a half-written video behind the name.
    """
    n_frames = 0
    with atomic_replace(path) as tmp:
        if video_format == "gif":
            frames = list(frames)
            tmp.write_bytes(encode_gif(frames, fps))
            n_frames = len(frames)
        else:
            import imageio_ffmpeg

            writer = None
            try:
                for frame in frames:
                    if writer is None:  # the frame size is known with the first frame
                        # The temporary's name does not end in .mp4, so ffmpeg is told the container.
                        writer = imageio_ffmpeg.write_frames(
                            str(tmp), (frame.shape[1], frame.shape[0]), fps=fps, codec="libx264",
                            quality=MP4_QUALITY, macro_block_size=16, output_params=["-f", "mp4"],
                            ffmpeg_log_level="error")
                        writer.send(None)  # start the generator (and the ffmpeg process)
                    writer.send(np.ascontiguousarray(frame))
                    n_frames += 1
            finally:
                if writer is not None:
                    writer.close()  # flushes and waits for ffmpeg
    return n_frames


def log_tensorboard_video(logger: Any, tag: str, frames: Sequence[np.ndarray], step: int,
                          fps: int = VIDEO_FPS) -> int:
    """Write ``frames`` as an animated-GIF image summary ``tag`` to the logger's TensorBoard file(s).

    Returns the GIF's size in bytes (0 when the logger has no TensorBoard output).
    """
    from stable_baselines3.common.logger import TensorBoardOutputFormat
    from tensorboard.compat.proto.summary_pb2 import Summary

    writers = [fmt.writer for fmt in logger.output_formats if isinstance(fmt, TensorBoardOutputFormat)]
    if not writers or not frames:
        return 0
    gif = encode_gif(frames, fps)
    height, width = frames[0].shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    for writer in writers:
        assert writer.file_writer is not None, "a SummaryWriter opens its file writer when it is made"
        writer.file_writer.add_summary(summary, global_step=step)
        writer.flush()
    return len(gif)


class VideoFolder:
    """``EpisodeRecorder``'s ``on_episode`` for ``eval --video``: each episode becomes a file at once.

    Files are ``<folder>/<run stem>_<steps>_ep<k>.<mp4|gif>``, e.g. ``ch09_manip_noDrQ_criticEnc_FetchPush-v4_
    seed0_500K_ep0.mp4``; ``written`` lists them (paths relative to ``relative_to``) for the eval JSON.
    """

    def __init__(self, folder: Path, run_stem: str, steps_label: str, video_format: VideoFormat,
                 relative_to: Path) -> None:
        self.folder, self.run_stem, self.steps_label = folder, run_stem, steps_label
        self.video_format, self.relative_to = video_format, relative_to
        self.written: list[dict[str, Any]] = []
        self.seconds = 0.0
        """Wall time spent composing and encoding."""

    def path(self, episode: int) -> Path:
        return self.folder / f"{self.run_stem}_{self.steps_label}_ep{episode}.{self.video_format}"

    def __call__(self, episode: RecordedEpisode) -> None:
        start = time.perf_counter()
        path = self.path(episode.episode)
        title = f"{self.run_stem.removeprefix('ch09_')}, {self.steps_label} steps, episode {episode.episode}"
        n_frames = write_video(path, episode.frames(title), self.video_format)
        self.written.append({"episode": episode.episode, "file": str(path.relative_to(self.relative_to)),
                             "frames": n_frames, "success": episode.success[-1]})
        self.seconds += time.perf_counter() - start

