"""What every lab needs and no lab teaches: the MuJoCo guard, GL-context repair, memory checks, the CLI.

The labs start with their lesson; the plumbing they share lives here, so a reader meets it only when curious.

| piece                                                 | what it does                                          |
|-------------------------------------------------------|-------------------------------------------------------|
| environment guard (runs on import)                    | refuses a mujoco that breaks FetchPush-v4, picks EGL  |
| ``exit_code`` on the errors below                     | ``cli_guard`` prints their sentence alone, exit 2     |
| ``RendererUnavailableError``                          | the one sentence a broken renderer ends in            |
| ``make_render_context_current``, ``close_render_context`` | several MuJoCo envs rendering in one process      |
| ``available_memory``, ``check_memory_fits``          | the one "does this buffer fit" check (cgroup limits too) |
| ``Claim``, ``report``                                 | ``--verify``: one PASS/FAIL line per claim, a summary |
| ``lab_main``                                          | every lab's ``main()`` (tyro): one flag per mode      |
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from cli_guard import USER_ERROR_EXIT, parse_with_one_line_errors

# ---------------------------------------------------------------------------------------------------------
# Environment guard: the project's ONE check of the MuJoCo version and the OpenGL backend
# ---------------------------------------------------------------------------------------------------------
# MuJoCo picks its OpenGL backend when it is imported, so this must come before any mujoco import.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


MUJOCO_PIN = "3.11.0"
FIRST_BROKEN_MUJOCO = (3, 12)


class MissingPackageError(ImportError):
    """A pinned package is not installed; the message is one sentence naming the fix."""

    exit_code = USER_ERROR_EXIT  # the entry points' guard (cli_guard) prints the sentence alone


try:
    _mujoco_version = metadata.version("mujoco")
except metadata.PackageNotFoundError as _exc:
    raise MissingPackageError(
        "mujoco is not installed in this Python environment; run `pip install -r requirements.txt` "
        f"(it pins mujoco=={MUJOCO_PIN}) or use `bash docker/dev.sh`."
    ) from _exc


class MujocoVersionError(ImportError):
    """The installed mujoco breaks FetchPush-v4; the message is one sentence naming the fix."""

    exit_code = USER_ERROR_EXIT


_major_minor = re.match(r"(\d+)\.(\d+)", _mujoco_version)  # "3.11.0", also "4.0.0rc1" or "3.12.dev0"
if _major_minor is not None and (int(_major_minor[1]), int(_major_minor[2])) >= FIRST_BROKEN_MUJOCO:
    raise MujocoVersionError(
        f"mujoco {_mujoco_version} breaks FetchPush-v4 in gymnasium-robotics 1.4.2 (an AssertionError in "
        f"set_joint_qpos under pybind11 3.1), so create a clean virtual environment and "
        f"`pip install mujoco=={MUJOCO_PIN}` there."
    )

# Importing mujoco already initialises the OpenGL backend named by MUJOCO_GL; a broken backend (for example
# MUJOCO_GL=osmesa without libOSMesa) fails right here. We keep the error and report it from make_fetch_env,
# so that labs which never build an env (the encoders) still import.
_renderer_import_error: Exception | None = None
try:
    import gymnasium as gym
    import mujoco  # imported for its side effect too: the GL backend is chosen now

    # gymnasium-robotics prints an unrelated notice about Adroit envs to stderr on import; keep output clean.
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)
except ModuleNotFoundError as _exc:
    if _exc.name != "gymnasium_robotics":
        _renderer_import_error = _exc  # e.g. PyOpenGL missing: a rendering problem
    else:
        raise MissingPackageError(
            "gymnasium-robotics is not installed in this Python environment; run `pip install -r requirements.txt` "
            "or use `bash docker/dev.sh`."
        ) from _exc
except Exception as _exc:  # any backend failure: ImportError, AttributeError, mujoco.FatalError
    _renderer_import_error = _exc


class RendererUnavailableError(RuntimeError):
    """MuJoCo cannot render off-screen with the selected ``MUJOCO_GL`` backend."""

    exit_code = USER_ERROR_EXIT

    @classmethod
    def from_exception(cls, exc: BaseException) -> RendererUnavailableError:
        backend = os.environ.get("MUJOCO_GL", "<unset>")
        return cls(
            f"MuJoCo cannot render with MUJOCO_GL={backend} ({type(exc).__name__}: {str(exc)[:160]}); "
            "start Python with MUJOCO_GL=egl (install libegl1 and the Mesa GL libraries if EGL itself fails), "
            "see the README section 'Troubleshooting'."
        )


@contextlib.contextmanager
def renderer_start_warnings() -> Iterator[None]:
    """Hold the warnings MuJoCo's GL backend prints while it creates a context (GLFW warns, then fails):
    issued again if the context starts, dropped if it fails, where ``RendererUnavailableError`` says in one
    sentence what to do."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for held in caught:
        warnings.warn_explicit(held.message, held.category, held.filename, held.lineno)


def renderer_import_error() -> Exception | None:
    """The exception importing mujoco's GL backend raised, or None if rendering can start."""
    return _renderer_import_error


# ---------------------------------------------------------------------------------------------------------
# Verify plumbing shared by every lab: one line per claim, a summary, and an exit code
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Claim:
    """One checked statement of a lab's ``--verify``."""

    name: str
    """The claim in words, e.g. 'pixels are uint8 (12, 84, 84)'."""
    passed: bool
    """Whether the measurement supports the claim."""
    detail: str
    """The measured value(s) that decided it, printed in parentheses."""


def report(claims: Sequence[Claim]) -> int:
    """Print ``PASS/FAIL  <claim>  (<measured>)`` per claim and a summary; return the process exit code."""
    for claim in claims:
        print(f"{'PASS' if claim.passed else 'FAIL'}  {claim.name}  ({claim.detail})")
    n_passed = sum(claim.passed for claim in claims)
    print(f"{n_passed}/{len(claims)} claims passed")
    return 0 if n_passed == len(claims) else 1


LabMode = Callable[..., "int | Sequence[Claim]"]
"""One mode of a lab's command line (``--verify``, ``--probe``, ...): returns an exit code, or claims to report."""


def lab_main(
    doc: str | None, modes: Mapping[str, LabMode], argv: Sequence[str] | None = None, options: type | None = None
) -> int:
    """Every lab's ``main()``: one flag per mode, plus the fields of ``options``, parsed by tyro.

    | a mode returns  | the command prints                                 | exit code              |
    |-----------------|----------------------------------------------------|------------------------|
    | claims          | one PASS/FAIL line per claim, a summary, the time  | 0 if all pass, else 1  |
    | an int          | whatever the mode printed                          | that int               |

    ``modes`` maps a flag name to its function; the first line of the function's docstring is the flag's help.
    ``options`` is a dataclass whose fields become further flags (their docstrings are the help, tyro shows the
    defaults); each mode is then called with the parsed instance, otherwise with no argument. The modes form
    one mutually exclusive group. An option the dataclass refuses (a ``ValueError`` in ``__post_init__``), two
    modes at once, a bad flag or a renderer that cannot start end in one message on stderr and exit code 2. No
    mode prints the help (exit code 0).
    """
    import tyro  # the command line only: importing a lab as a library does not need it

    def first_line(mode: LabMode) -> str:
        return (mode.__doc__ or "").strip().split("\n")[0].rstrip(".")

    one_mode = tyro.conf.create_mutex_group(required=False, title="modes (one at a time)")
    fields = [
        (name, Annotated[bool, one_mode, tyro.conf.arg(help=first_line(mode), help_behavior_hint="")],
         dataclasses.field(default=False))
        for name, mode in modes.items()
    ]
    parser_class = dataclasses.make_dataclass("options", fields, bases=(options,) if options is not None else ())
    description = (doc or "").strip().split("\n\n")[0]
    config = (tyro.conf.FlagCreatePairsOff,)  # `--verify`, without a `--no-verify` twin
    try:  # tyro exits after printing the help (0) or a usage error (2); a lab's main() returns its exit code
        args = parse_with_one_line_errors(
            lambda: tyro.cli(parser_class, args=argv, description=description, config=config))
        chosen = [name for name in modes if getattr(args, name)]
        if not chosen:
            tyro.cli(parser_class, args=["--help"], description=description, config=config)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    mode = modes[chosen[0]]
    start = time.perf_counter()
    try:
        result = mode(args) if options is not None else mode()
        if isinstance(result, int):
            return result
        status = report(result)
    except RendererUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"(--{chosen[0]} took {time.perf_counter() - start:.1f} s)")
    return status


# ---------------------------------------------------------------------------------------------------------
# Several MuJoCo envs in one process: each render in its own GL context
# ---------------------------------------------------------------------------------------------------------
def _offscreen_viewers(env: gym.Env) -> list:
    """The env's live off-screen MuJoCo viewers (each owns one GL context and one ``MjrContext``)."""
    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    viewers = dict(getattr(renderer, "_viewers", {}) or {})  # render_mode -> viewer, created on first render
    viewers.setdefault(None, getattr(renderer, "viewer", None))
    unique = {id(v): v for v in viewers.values() if v is not None}.values()
    return [v for v in unique if getattr(v, "con", None) is not None and hasattr(v, "opengl_context")]


def _framebuffer_exists(name: int) -> bool:
    """Whether ``name`` is still a framebuffer of the CURRENT GL context (one cheap GL query)."""
    try:
        from OpenGL import GL
    except ImportError:  # a backend without PyOpenGL: skip the check
        return True
    return bool(GL.glIsFramebuffer(name))


def make_render_context_current(env: gym.Env) -> None:
    """Make ``env``'s OpenGL context current and its off-screen framebuffer intact before it renders.

    Every MuJoCo env owns an off-screen GL context, and only one context is current per thread. Gymnasium
    1.4.0's ``MujocoRenderer`` switches contexts only when ONE env has several viewers (Gymnasium issue
    #736), and creating or closing any env releases the current one (``eglReleaseThread``), so with two
    envs in one process an env would render through the wrong context or none: black 480x480 frames.

    The second trap is subtler. GL object names are per context and every MuJoCo context numbers its
    objects alike (off-screen framebuffer 1, ...). A closed env keeps its ``MjrContext`` until Python
    garbage-collects the env, and its destructor (``mjr_freeContext``) then deletes "framebuffer 1,
    textures 2-3, ..." in whatever context is current at that moment: ANOTHER env's. Its frames come back
    black or frozen. ``PixelObservationWrapper.close`` prevents this for envs built here; envs built
    elsewhere (a raw ``gym.make``) still can, so we check that our framebuffer exists and rebuild the
    ``MjrContext`` if it was deleted. Cost per render: one context switch and one GL query, small against
    the render itself.
    """
    for viewer in _offscreen_viewers(env):  # none until the first render creates the context
        viewer.make_context_current()
        if viewer.con.offFBO and not _framebuffer_exists(viewer.con.offFBO):
            font_scale = viewer.con.fontScale
            viewer.con.free()  # delete what is left of the old objects, in OUR context
            viewer.con = mujoco.MjrContext(viewer.model, font_scale)  # re-upload meshes, textures, buffers
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, viewer.con)  # readPixels reads this one


def _current_egl_context() -> Any:
    """The thread's current EGL context (None when none is, or when the backend is not EGL)."""
    if os.environ.get("MUJOCO_GL") != "egl":
        return None
    from mujoco.egl import egl_ext as EGL

    context = EGL.eglGetCurrentContext()
    return context if context else None


def close_render_context(env: gym.Env) -> None:
    """Close ``env`` without disturbing the GL objects of other envs in the same process.

    Frees each viewer's ``MjrContext`` NOW, while its own context is current (instead of at some later
    garbage collection, inside whichever context is current then), lets Gymnasium destroy the context,
    and makes the context that was current before (another env's) current again.
    """
    previous = _current_egl_context()
    ours = set()
    for viewer in _offscreen_viewers(env):
        context = getattr(viewer.opengl_context, "_context", None)
        if context:
            ours.add(getattr(context, "address", None))
            viewer.make_context_current()
            viewer.con.free()  # mjr_freeContext in its own context; the struct is reset, so a later free is a no-op
    env.close()  # Gymnasium destroys the GL contexts (and calls eglReleaseThread)
    if previous is not None and previous.address not in ours:
        import mujoco.egl
        from mujoco.egl import egl_ext as EGL

        EGL.eglMakeCurrent(mujoco.egl.EGL_DISPLAY, EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE, previous)


# ---------------------------------------------------------------------------------------------------------
# Memory: the one "does this buffer fit" check
# ---------------------------------------------------------------------------------------------------------
class AvailableMemory(NamedTuple):
    """Bytes a buffer can still take, and what set that figure (printed beside it, named in a refusal)."""

    bytes_available: int
    limited_by: str
    fix: str = "free memory"
    """What a refusal asks for: free memory, or also raise the cgroup limit that set the figure."""


@dataclass(frozen=True)
class CgroupLayout:
    """Where one cgroup version keeps a cgroup's memory limit and usage (under its mount, per cgroup folder)."""

    version: str
    mounts: tuple[str, ...]  # relative to the file-system root; v2 is at /sys/fs/cgroup, or .../unified (hybrid)
    limit: str  # bytes, or "max" (v2) for none
    usage: str  # bytes charged to the cgroup, page cache included
    reclaimable: str  # the key in memory.stat of page cache the kernel drops before it OOM-kills


NO_CGROUP_LIMIT = 2**60
"""cgroup v1 writes "no limit" as a huge byte count (PAGE_COUNTER_MAX pages); anything above this is none."""


CGROUP_V2 = CgroupLayout("cgroup v2", ("sys/fs/cgroup", "sys/fs/cgroup/unified"), "memory.max", "memory.current",
                         "inactive_file")
CGROUP_V1 = CgroupLayout("cgroup v1", ("sys/fs/cgroup/memory",), "memory.limit_in_bytes", "memory.usage_in_bytes",
                         "total_inactive_file")


def _read_number(path: Path) -> int | None:
    """The integer in a cgroup file; None when the file is missing or says "max" (no limit)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _memory_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory_available(root: Path = Path("/")) -> AvailableMemory | None:
    """What the memory limits of this process's cgroups still allow, or None where none is set.

    ``/proc/self/cgroup`` names the process's cgroup in each hierarchy (``0::/path`` for v2, ``N:memory:/path``
    for v1). That cgroup and each ancestor up to the mount may set a limit (Docker's ``--memory``, Slurm's
    ``--mem``, a Kubernetes limit); each allows its limit minus its usage, plus the page cache the kernel
    reclaims first (as MemAvailable counts it), and the smallest of them is what this process can still get.
    A cgroup path that is not under the mount (a container without its own cgroup namespace) falls back to
    the mount itself. ``root`` is the file-system root, a folder of such files in tests.
    """
    try:
        membership = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in membership:
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup_path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            layout = CGROUP_V2
        elif "memory" in controllers.split(","):
            layout = CGROUP_V1
        else:
            continue
        parts = Path(cgroup_path.strip().lstrip("/")).parts
        for mount in layout.mounts:
            for depth in range(len(parts), -1, -1):  # the process's own cgroup first, then each ancestor
                folder = root / mount / Path(*parts[:depth])
                limit, usage = _read_number(folder / layout.limit), _read_number(folder / layout.usage)
                if limit is None or usage is None or limit >= NO_CGROUP_LIMIT:
                    continue
                free = limit - usage + _memory_stat(folder / "memory.stat", layout.reclaimable)
                shown = "/" / (folder / layout.limit).relative_to(root)
                found.append(AvailableMemory(max(min(free, limit), 0),
                                             f"the {layout.version} limit {shown} minus {layout.usage}",
                                             "free memory or raise that limit"))
    return min(found, default=None)


def host_memory_available(root: Path = Path("/")) -> int:
    """Memory the OS could give a process now without swapping (``MemAvailable`` in /proc/meminfo); outside
    Linux there is no /proc/meminfo, and total physical memory (an upper bound) stands in."""
    try:
        with open(root / "proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory(root: Path = Path("/")) -> AvailableMemory:
    """RAM this process can still allocate: the host's MemAvailable, or less where a cgroup limit (a container,
    a Slurm job) allows less; ``limited_by`` says which, so a refusal points at the limit to raise."""
    host = host_memory_available(root)
    cgroup = cgroup_memory_available(root)
    if cgroup is not None and cgroup.bytes_available < host:
        return AvailableMemory(cgroup.bytes_available, f"{cgroup.limited_by}, below the host's MemAvailable",
                               cgroup.fix)
    below = f", below {cgroup.limited_by}" if cgroup is not None else ""
    return AvailableMemory(host, f"the host's MemAvailable{below}")


MEMORY_RESERVE_BYTES = 2 * 1024**3
"""Free memory a buffer must leave for everything else (networks, envs, batches), on each device it uses."""


class MemoryBudgetError(ValueError):
    """A buffer would not fit in the memory that is free; the message says the largest size that would."""

    exit_code = USER_ERROR_EXIT

    def __init__(self, message: str, device: str = "cpu") -> None:
        super().__init__(message)
        self.device = device  # where it would not fit: 'cpu' (RAM) or a CUDA device such as 'cuda:0'


def free_memory(device: Any = "cpu") -> AvailableMemory:
    """Bytes free now where a buffer on ``device`` would live, and what set the figure: RAM for the CPU
    (``available_memory``: the host's, or a cgroup's limit), GPU memory for CUDA."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return AvailableMemory(int(free), f"free GPU memory on {device}", "free GPU memory")
    return available_memory()


def check_memory_fits(
    what: str, n_items: int, bytes_per_item: int, device: Any = "cpu", unit: str = "transitions",
    reserve: int = MEMORY_RESERVE_BYTES, free: AvailableMemory | None = None,
) -> int:
    """Refuse, in one sentence, ``n_items`` x ``bytes_per_item`` that would not fit on ``device``.

    Returns the bytes needed. ``reserve`` bytes stay free for everything else; ``free`` is a reading of
    ``free_memory(device)`` the caller already made (read now when None). numpy and torch allocate
    lazily, so without this check a too-large buffer fails hours later (or the OOM killer ends it), when it fills.
    """
    import torch

    needed = n_items * bytes_per_item
    free = free_memory(device) if free is None else free
    usable = max(free.bytes_available - reserve, 0)
    if needed > usable:
        where = "RAM" if torch.device(device).type == "cpu" else f"GPU memory on {device}"
        raise MemoryBudgetError(
            f"{what} of {n_items:,} {unit} needs {needed / 1e9:.1f} GB of {where} ({bytes_per_item:,} bytes "
            f"each) but only {usable / 1e9:.1f} GB is free after a {reserve / 2**30:.0f} GiB reserve "
            f"({free.limited_by}); use {usable // max(bytes_per_item, 1):,} {unit} or fewer, or {free.fix}.",
            str(torch.device(device)),
        )
    return needed
