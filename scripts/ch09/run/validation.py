"""Checks of what a user hands the scripts: flag values, folders, devices, and every JSON file read back.

Each check raises ``UserError`` with one sentence that names the flag or file, what was expected, and what
to do; the entry points run them before any env worker, model or buffer exists.

| check                    | refuses                                                                     |
|--------------------------|-----------------------------------------------------------------------------|
| ``check_seed``           | a seed outside [0, 2**32), the range NumPy's and SB3's seeding accept        |
| ``check_device``         | a torch device that does not exist here (``tpu``; ``cuda`` without CUDA)    |
| ``check_writable_folder``| a path that is a file, lies under a file, or cannot be written (``/proc``)  |
| ``read_json_object``     | a JSON file that is missing, not JSON, or not an object                     |
| ``check_fields``         | an object whose fields do not have the types (and ranges) a reader relies on |

Standard library only at import time (torch is imported inside ``check_device``): the figure script
checks the eval files it plots without loading torch.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

from ch09.errors import UserError

SEED_LIMIT = 2**32
"""Seeds must lie in [0, SEED_LIMIT): NumPy's SeedSequence and SB3's set_random_seed refuse others."""

FieldType: TypeAlias = type | tuple[type, ...]
"""A ``check_fields`` spec of one field: a JSON type, or a tuple of those any of which will do."""
Number: FieldType = (int, float)
"""``check_fields`` spec for a number (an int is a fine float)."""
OptionalDict: FieldType = (dict, type(None))
"""``check_fields`` spec for an object or null."""


def flag(name: str) -> str:
    """'learning_starts' -> '--learning-starts'."""
    return f"--{name.replace('_', '-')}"


def check_seed(name: str, value: int) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise UserError(f"{flag(name)} must lie in [0, 2**32) (NumPy and SB3 seed with 32 bits), got {value}; "
                        "pick a seed such as 0, 1, 2.")


def check_device(name: str, value: str) -> None:
    """Refuse a torch device that this machine does not have ('auto' is always fine)."""
    if value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag(name)} {value!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise UserError(f"{flag(name)} {value} asks for a CUDA GPU, but torch sees none on this machine "
                            f"({built}); use --device cpu, or auto to take a GPU only where there is one.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag(name)} {value}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag(name)} mps needs Apple's Metal backend, which torch does not find here; "
                        "use --device cpu or auto.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag(name)} {value!r} is a device type this project does not run on; "
                        "use auto, cpu, cuda or cuda:N.")


def check_writable_folder(name: str, path: Path) -> Path:
    """The resolved folder, created if needed and proven writable by writing (and removing) a probe file."""
    folder = Path(path).expanduser().resolve()
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == folder else f"lies under {parent}, which is a file"
            raise UserError(f"{flag(name)} {folder} {where}; pass a folder (it is created if missing).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"{flag(name)} {folder} cannot be written ({exc.strerror or exc}); pass a folder you "
                        "can write to (it is created if missing).") from None
    return folder


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a missing, unreadable, non-JSON or non-object file is one sentence + ``fix``."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{what} {path} is not readable JSON ({str(exc)[:120]}); {fix}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a JSON {type(data).__name__}, not the object this script writes; "
                        f"{fix}.")
    return data


def _type_name(spec: FieldType) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "true/false", type(None): "null"}
    specs = spec if isinstance(spec, tuple) else (spec,)
    if set(specs) == {int, float}:
        return "a number"
    return " or ".join(names.get(s, s.__name__) for s in specs)


def _matches(value: Any, spec: FieldType) -> bool:
    specs = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in specs:  # JSON true is not a step count
        return False
    return isinstance(value, specs) or (float in specs and isinstance(value, int))


def check_fields(data: Mapping[str, Any], spec: Mapping[str, FieldType], what: str,
                 fix: str) -> None:
    """Refuse, in one sentence ending in ``fix``, the first field of ``spec`` that is missing or of another type.

    ``spec`` maps a field name to its type (``int``, ``str``, ``list``, ``dict``, ``Number``, ``OptionalDict``).
    """
    for key, expected in spec.items():
        if key not in data:
            raise UserError(f"{what} has no field {key!r} ({_type_name(expected)} expected); {fix}.")
        if not _matches(data[key], expected):
            shown = json.dumps(data[key], default=str)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise UserError(f"{what}: field {key!r} should be {_type_name(expected)}, found "
                            f"{type(data[key]).__name__} {shown}; {fix}.")


def check_range(value: float, low: float, high: float, what: str, fix: str) -> None:
    if not low <= value <= high:
        raise UserError(f"{what} is {value}, outside [{low:g}, {high:g}]; {fix}.")


def positive_seconds(name: str, value: float) -> None:
    """A timeout: positive and finite (``signal.setitimer`` refuses negatives, and inf would never fire)."""
    if not (value > 0 and value != float("inf")):
        raise UserError(f"{flag(name)} must be a positive number of seconds, got {value}.")

