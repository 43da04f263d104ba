"""Releases: publish a finished run as one folder, and fetch a published checkpoint safely.

An SB3 checkpoint is a zip of cloudpickled Python objects: loading one runs whatever code it carries. So a
checkpoint from elsewhere is loaded only after its SHA-256 equals the digest its publisher gave (the release's
``SHA256SUMS``, or ``eval --sha256 HEX``); until then a download lives under a ``.part`` name.

| piece                   | what it does                                                                     |
|-------------------------|----------------------------------------------------------------------------------|
| ``checkpoint_for_eval`` | where ``eval`` gets its checkpoint: a path, a URL, or a release (folder or URL)   |
| ``download``            | HTTP(S) into ``<name>.part``, resumed by a Range request, renamed once verified   |
| ``release_files``       | which files of a run a release holds; refuses a stale evaluation or metadata      |
| ``export_scalars_csv``  | every TensorBoard scalar of a run as ``tag,step,wall_time,value`` rows            |
| ``model_card``          | the release's ``README.md`` (with Hugging Face model-card front matter)           |
| ``write_release``       | the release folder, written under a temporary name and renamed whole              |
| ``package_run``         | all of the above for one run: what ``ch09_pixel_push.py package`` does           |

A release folder, ready to upload as it is (a Hugging Face model repository, or any file host)::

    README.md                    model card: task, flags, steps, success rate, hardware, licence, the warning
    SHA256SUMS                   the digest of every other file (``sha256sum -c SHA256SUMS`` checks them)
    <stem>.zip                   the final model
    <stem>_<500K>_steps.zip ...  its periodic snapshots
    <stem>.meta.json             config, versions, commit, steps, wall time, each zip's SHA-256
    <stem>_eval.json             the final model's evaluation (and each snapshot's, where one was evaluated)
    <stem>_scalars.csv           the TensorBoard curves as CSV
    tensorboard/                 the run's event files (``tensorboard --logdir``, ``ch09_figures.py loss-phases``)
    videos/...                   eval videos, where ``eval --video`` made some
    LICENSE                      the repository's licence, where it has one

On Hugging Face a file's URL is ``https://huggingface.co/<user>/<repo>/resolve/main/<file>``, so the release
URL to pass to ``eval --from-release`` is ``https://huggingface.co/<user>/<repo>/resolve/main``.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from ch09.errors import UserError
from ch09.run.artifacts import (
    EVAL_FORMAT,
    PERIODIC_RE,
    REPO_ROOT,
    RunPaths,
    atomic_replace,
    format_steps,
    parse_steps,
    read_scalar_events,
    tensorboard_event_files,
)
from ch09.run.digest import (
    SHA256SUMS_NAME,
    DigestMismatchError,
    is_hex_digest,
    parse_sha256sums,
    read_sha256sums,
    sha256_file,
    verify_sha256,
    write_sha256sums,
)
from pixel_wrapper import FETCH_OBS_DIM, FETCH_REACH_OBS_DIM, PROPRIO_DIM

DOWNLOAD_ATTEMPTS = 5
"""Connections in a row that bring no new byte before a download gives up; one that does starts the count
again, so a long download over a flaky link keeps going (each time asking for the rest with HTTP Range)."""
RETRY_DELAY_S = 1.0
"""Seconds before asking again; after each connection in a row that brought nothing, one more of these."""
READ_TIMEOUT_S = 60.0
"""Seconds without a byte before a connection counts as broken (and is resumed)."""
CHUNK_BYTES = 1 << 20
"""Bytes read from the network per call."""
MAX_TEXT_BYTES = 1 << 20
"""Largest SHA256SUMS read into memory: a list of a few dozen digests is a few kilobytes."""
PART_SUFFIX = ".part"
"""A download's name until its digest has matched."""
LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "COPYING")
"""Files at the repository root that carry its licence (the first one found goes into a release)."""
USER_AGENT = "ch09-pixel-push-release/1"

LOADING_RUNS_CODE = (
    "An SB3 checkpoint is a zip of cloudpickled Python objects, so loading one runs whatever code it carries: "
    "load only files whose SHA-256 matches the SHA256SUMS of a publisher you trust "
    "(`eval --from-release` and `eval --sha256` check it before anything is unpickled; "
    "`sha256sum -c SHA256SUMS` checks a downloaded folder)."
)
"""The warning every release and the README carry."""

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# Where eval gets its checkpoint
# ---------------------------------------------------------------------------------------------------------
def is_url(text: str) -> bool:
    """Whether ``text`` is an http(s) URL (anything else is a local path)."""
    return urllib.parse.urlsplit(text).scheme in ("http", "https")


def checkpoint_for_eval(checkpoint: str | None, from_release: str | None, steps: str | None,
                        sha256: str | None, download_dir: Path) -> Path:
    """The local checkpoint ``eval`` may load, verified; nothing is unpickled before this returns.

    | given                                | digest checked against                          | file returned       |
    |--------------------------------------|-------------------------------------------------|---------------------|
    | ``--checkpoint PATH``                | ``--sha256``; a ``SHA256SUMS`` beside it         | PATH                |
    | ``--checkpoint URL``                 | ``--sha256``; a ``SHA256SUMS`` beside it (one)   | download_dir/<name> |
    | ``--from-release FOLDER [--steps]``  | the folder's ``SHA256SUMS`` (and ``--sha256``)   | FOLDER/<name>       |
    | ``--from-release URL [--steps]``     | the release's ``SHA256SUMS`` (and ``--sha256``)  | download_dir/<name> |

    The run's ``.meta.json`` comes along (it is JSON, read as data, and verified where ``SHA256SUMS`` lists it).
    """
    if (checkpoint is None) == (from_release is None):
        raise UserError("Give eval one of --checkpoint PATH_OR_URL or --from-release FOLDER_OR_URL.")
    if steps is not None and from_release is None:
        raise UserError("--steps picks a snapshot of --from-release; with --checkpoint, pass the snapshot's own "
                        "..._<N>_steps.zip.")
    if sha256 is not None and not is_hex_digest(sha256):
        raise UserError(f"--sha256 {sha256!r} is not a SHA-256 digest; pass the 64 hexadecimal characters the "
                        "publisher gave.")
    wanted = sha256.strip().lower() if sha256 is not None else None
    if from_release is not None:
        return _checkpoint_from_release(from_release, steps, wanted, download_dir)
    assert checkpoint is not None
    if is_url(checkpoint):
        return _checkpoint_from_url(checkpoint, wanted, download_dir)
    _refuse_other_schemes(checkpoint)
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; pass the .zip that train wrote under checkpoints/.")
    sums_path = path.parent / SHA256SUMS_NAME
    sums = _read_sums(sums_path) if sums_path.is_file() else {}
    _verify(path, _expected_digest(path.name, sums.get(path.name), wanted, sums_path))
    return path


def _checkpoint_from_release(source: str, steps: str | None, wanted: str | None, download_dir: Path) -> Path:
    if is_url(source):
        base = source.rstrip("/")
        sums_url = f"{base}/{SHA256SUMS_NAME}"
        text = fetch_text(sums_url)
        assert text is not None
        sums = _parse_sums(text, sums_url)
        name = pick_checkpoint(sums, steps, source)
        meta_name = _listed_meta(name, sums, sums_url)
        expected = _expected_digest(name, sums[name], wanted, sums_url)
        download(f"{base}/{urllib.parse.quote(meta_name)}", download_dir / meta_name, sums[meta_name])
        return download(f"{base}/{urllib.parse.quote(name)}", download_dir / name, expected)
    _refuse_other_schemes(source)
    folder = Path(source).expanduser().resolve()
    sums_path = folder / SHA256SUMS_NAME
    if not sums_path.is_file():
        raise UserError(f"{folder} is not a release folder (it has no {SHA256SUMS_NAME}); pass the folder that "
                        "`package` wrote, or its URL.")
    sums = _read_sums(sums_path)
    name = pick_checkpoint(sums, steps, str(folder))
    meta_name = _listed_meta(name, sums, sums_path)
    expected = _expected_digest(name, sums[name], wanted, sums_path)
    _verify(folder / meta_name, sums[meta_name])
    _verify(folder / name, expected)
    return folder / name


def _checkpoint_from_url(url: str, wanted: str | None, download_dir: Path) -> Path:
    parts = urllib.parse.urlsplit(url)
    folder_path, _, file_name = parts.path.rpartition("/")
    name = _safe_name(urllib.parse.unquote(file_name), url)
    if not name.endswith(".zip"):
        raise UserError(f"{url} does not name a .zip checkpoint; for a release folder use --from-release URL.")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, folder_path, "", ""))
    sums_url = f"{base}/{SHA256SUMS_NAME}"
    text = fetch_text(sums_url, missing_ok=True)
    sums = _parse_sums(text, sums_url) if text is not None else {}
    expected = _expected_digest(name, sums.get(name), wanted, sums_url)
    if expected is None:
        raise UserError(f"No digest is known for {url} (no {SHA256SUMS_NAME} beside it lists {name}), and loading "
                        "a checkpoint runs its code; pass --sha256 HEX with the digest its publisher gave.")
    # The snapshot's own metadata, else its run's: those the list names, or (no list) whichever the server has.
    candidates = [meta for meta in meta_names(name) if meta in sums] if sums else meta_names(name)
    for meta_name in candidates:
        if download(f"{base}/{urllib.parse.quote(meta_name)}", download_dir / meta_name, sums.get(meta_name),
                    missing_ok=True) is not None:
            break
    else:
        raise UserError(f"There is no {' or '.join(meta_names(name))} beside {url}; eval needs the run's metadata "
                        "(train writes it next to the checkpoint), so ask the publisher for it.")
    return download(url, download_dir / name, expected)


def meta_names(zip_name: str) -> list[str]:
    """Metadata files that may describe ``zip_name``: its own, then (for a snapshot) its run's."""
    stem = zip_name.removesuffix(".zip")
    names = [f"{stem}.meta.json"]
    if match := PERIODIC_RE.match(stem):
        names.append(f"{match['stem']}.meta.json")
    return names


def pick_checkpoint(sums: dict[str, str], steps: str | None, source: str) -> str:
    """The zip of a release: the final model, or with ``steps`` ('1M', '500K', '1000000') that snapshot."""
    zips = sorted(name for name in sums if name.endswith(".zip") and "/" not in name)
    finals = [name for name in zips if not PERIODIC_RE.match(name.removesuffix(".zip"))]
    if len(finals) != 1:
        raise UserError(f"{source} lists {len(finals)} final checkpoints ({', '.join(finals) or 'none'}) where a "
                        "release has one; pass the .zip you want with --checkpoint instead.")
    final = finals[0]
    if steps is None:
        return _safe_name(final, source)
    try:
        wanted_steps = parse_steps(steps.strip())
    except ValueError:
        raise UserError(f"--steps {steps!r} is not a step count; use e.g. 500K, 1M, 1.5M or 1000000.") from None
    stem = final.removesuffix(".zip")
    snapshots = {parse_steps(match["steps"]): name for name in zips
                 if (match := PERIODIC_RE.match(name.removesuffix(".zip"))) and match["stem"] == stem}
    if wanted_steps not in snapshots:
        have = ", ".join(format_steps(s) for s in sorted(snapshots)) or "none"
        raise UserError(f"{source} has no snapshot at {format_steps(wanted_steps)} steps (it has: {have}); pick one "
                        "of those, or drop --steps for the final model.")
    return _safe_name(snapshots[wanted_steps], source)


def _listed_meta(zip_name: str, sums: dict[str, str], source: Path | str) -> str:
    for name in meta_names(zip_name):
        if name in sums:
            return _safe_name(name, str(source))
    raise UserError(f"{source} lists no metadata for {zip_name} ({' or '.join(meta_names(zip_name))}); the release "
                    "is incomplete, so package it again.")


def _safe_name(name: str, source: str) -> str:
    """A file name to write into the download folder: no folders, nothing hidden."""
    if not name or name != Path(name).name or name.startswith("."):
        raise UserError(f"{source} names the file {name!r}, which is not a plain file name; refusing to write it.")
    return name


def _refuse_other_schemes(text: str) -> None:
    scheme = urllib.parse.urlsplit(text).scheme
    if "://" in text and scheme not in ("", "file"):
        raise UserError(f"{text} is a {scheme}:// address; eval downloads http(s) URLs only, so fetch it yourself "
                        "and pass the local path (with --sha256).")


def _read_sums(path: Path) -> dict[str, str]:
    try:
        return read_sha256sums(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UserError(str(exc).rstrip(".") + ".") from None


def _parse_sums(text: str, source: str) -> dict[str, str]:
    try:
        return parse_sha256sums(text, source)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _expected_digest(name: str, listed: str | None, wanted: str | None, source: Path | str) -> str | None:
    """The one digest ``name`` must have: ``--sha256`` and the list must agree where both exist."""
    if listed is not None and wanted is not None and listed != wanted:
        raise UserError(f"--sha256 {wanted[:16]}... differs from {listed[:16]}..., which {source} lists for {name}; "
                        "check which digest the publisher gave (nothing was loaded).")
    return wanted or listed


def _verify(path: Path, expected: str | None) -> None:
    """Refuse ``path`` in one sentence unless its digest is ``expected`` (None: nothing to check against)."""
    if expected is None:
        return
    if not path.is_file():
        raise UserError(f"{path} is listed in {SHA256SUMS_NAME} but missing; download the whole release again.")
    try:
        verify_sha256(path, expected)
    except DigestMismatchError as exc:
        raise UserError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# Downloading: resumable, verified before it gets its name
# ---------------------------------------------------------------------------------------------------------
class _Interrupted(Exception):
    """The connection broke off (or the server failed for a moment): worth asking again."""


class _NotFound(UserError):
    """HTTP 404: the file is not on the server."""


@overload
def download(url: str, target: Path, expected: str | None, missing_ok: Literal[False] = False) -> Path: ...
@overload
def download(url: str, target: Path, expected: str | None, missing_ok: bool) -> Path | None: ...
def download(url: str, target: Path, expected: str | None, missing_ok: bool = False) -> Path | None:
    """Fetch ``url`` into ``target``, through ``target.part``, and return ``target``.

    The ``.part`` file is resumed (HTTP Range) when a connection breaks; it is renamed to ``target`` only
    after its SHA-256 equals ``expected``, and deleted when it does not. ``expected`` None is for metadata
    (JSON, parsed, never unpickled) that no ``SHA256SUMS`` lists. ``missing_ok``: return None on HTTP 404.
    A ``target`` that already exists is kept if it is the same file, and refused if it differs.
    """
    if target.is_file() and expected is not None:
        if sha256_file(target) == expected:
            print(f"[download] {target} is already here (SHA-256 matches)")
            return target
        raise UserError(f"{target} already exists and is not the published file (its SHA-256 differs); move it "
                        "aside, or pass another --artifact-root to download into.")
    part = target.with_name(target.name + PART_SUFFIX)
    try:
        _retrying(url, part, lambda: _fetch_into(url, part))
    except _NotFound:
        if missing_ok:
            return None
        raise
    if expected is not None:
        try:
            verify_sha256(part, expected, label=f"The file downloaded from {url}")
        except DigestMismatchError as exc:
            part.unlink()
            raise UserError(str(exc)) from None
    elif target.is_file():  # unverifiable metadata: keep the one here only if it is the same
        same = sha256_file(target) == sha256_file(part)
        part.unlink()
        if same:
            return target
        raise UserError(f"{target} already exists and differs from {url}; move it aside, or pass another "
                        "--artifact-root to download into.")
    os.replace(part, target)
    print(f"[download] {target} ({target.stat().st_size:,} bytes" + (", SHA-256 verified)" if expected else ")"))
    return target


def fetch_text(url: str, missing_ok: bool = False) -> str | None:
    """A small text file (a ``SHA256SUMS``) read into memory; None on HTTP 404 when ``missing_ok``."""
    def read() -> str:
        with _open(url, 0) as response:
            data = _read_body(response, MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise UserError(f"{url} is larger than {MAX_TEXT_BYTES:,} bytes, so it is not a {SHA256SUMS_NAME}.")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{url} is not text, so it is not a {SHA256SUMS_NAME}; check the address.") from None

    try:
        return _retrying(url, None, read)
    except _NotFound:
        if missing_ok:
            return None
        raise


def _retrying(url: str, part: Path | None, attempt_once: Callable[[], T]) -> T:
    """Run ``attempt_once`` until it succeeds; ``DOWNLOAD_ATTEMPTS`` broken connections in a row that add
    nothing to ``part`` end it in one sentence."""
    def size() -> int:
        return part.stat().st_size if part is not None and part.exists() else 0

    fruitless = 0
    while True:
        before = size()
        try:
            return attempt_once()
        except _Interrupted as exc:
            fruitless = 0 if size() > before else fruitless + 1
            have = f"{size():,} bytes kept in {part}" if size() else ""
            if fruitless == DOWNLOAD_ATTEMPTS:
                resume = f"; run the same command again to resume from the {have}" if have else \
                    "; run the same command again later"
                raise UserError(f"The download of {url} broke off {DOWNLOAD_ATTEMPTS} times in a row without "
                                f"getting further (last: {exc}){resume}.") from None
            print(f"[download] {url}: connection lost ({exc}){'; ' + have if have else ''}; asking again",
                  flush=True)
            time.sleep(RETRY_DELAY_S * (1 + fruitless))


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    """``urlopen`` with its failures sorted: worth retrying (``_Interrupted``), or one sentence."""
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise _NotFound(f"{url} answered HTTP 404 (not found); check the address (a release URL is the "
                            f"folder that holds {SHA256SUMS_NAME}).") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Interrupted(f"HTTP {exc.code} {exc.reason}") from None
        if exc.code == 416 and offset:
            raise
        raise UserError(f"{url} answered HTTP {exc.code} ({exc.reason}); check the address and that the file is "
                        "public.") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (ConnectionResetError, TimeoutError, http.client.HTTPException)):
            raise _Interrupted(f"{type(exc.reason).__name__}: {exc.reason}") from None
        raise UserError(f"Cannot reach {url} ({exc.reason}); check the address and the network, then run the "
                        "command again.") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(f"{type(exc).__name__}: {exc}") from None


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes or more (the caller refuses a body that large): a body cut short
    below the limit is a broken connection."""
    chunks, size = [], 0
    while size < limit:
        chunk = _read_chunk(response)
        if not chunk:
            _check_complete(response, size)
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_chunk(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        raise _Interrupted(f"{type(exc).__name__}: {exc}") from None


def _check_complete(response: http.client.HTTPResponse, received: int) -> None:
    # http.client returns b"" when a server closes early instead of raising IncompleteRead (it says so
    # itself, for compatibility), so the body length is checked here against Content-Length.
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and received < int(length):
        raise _Interrupted(f"the server closed the connection after {received:,} of {int(length):,} bytes")


def _fetch_into(url: str, part: Path) -> None:
    """One connection: append the rest of ``url`` to ``part`` (or start over when the server cannot resume)."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError:  # 416 to a Range request: the .part already holds the whole file
        return
    with response:
        if offset and response.status != 206:
            print(f"[download] {url}: the server cannot resume, starting over", flush=True)
            offset = 0
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink()
            raise _Interrupted(f"the server sent another range than bytes {offset}-")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        received = 0
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab" if offset else "wb") as handle, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=part.name.removesuffix(PART_SUFFIX), disable=None, leave=False) as bar:
                while chunk := _read_chunk(response):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # the network side is _Interrupted already: this is the disk
            raise UserError(f"Cannot write {part} ({exc.strerror or exc}); free space there or pass another "
                            "--artifact-root to download into.") from None
        _check_complete(response, received)


# ---------------------------------------------------------------------------------------------------------
# Packaging a run
# ---------------------------------------------------------------------------------------------------------
def snapshot_paths(checkpoint: Path) -> list[Path]:
    """The periodic snapshots beside a final checkpoint, in step order."""
    stem = checkpoint.name.removesuffix(".zip")
    found = []
    for path in checkpoint.parent.glob(f"{stem}_*_steps.zip"):
        match = PERIODIC_RE.match(path.name.removesuffix(".zip"))
        if match and match["stem"] == stem:
            found.append((parse_steps(match["steps"]), path))
    return [path for _, path in sorted(found)]


def licence_file(repo_root: Path = REPO_ROOT) -> Path | None:
    """The repository's licence file, or None where it sets none."""
    return next((repo_root / name for name in LICENSE_NAMES if (repo_root / name).is_file()), None)


def release_files(checkpoint: Path, meta_path: Path, meta: dict[str, Any], evaluation: dict[str, Any],
                  root: Path, run_dir: Path) -> dict[str, Path]:
    """``{name in the release: source file}`` for a run, refusing in one sentence what would mislead a reader:
    an evaluation of another step count or another file, or a zip that differs from the digest its metadata
    recorded when it was written."""
    stem = checkpoint.name.removesuffix(".zip")
    digest = sha256_file(checkpoint)
    evaluated = f"results/{stem}_eval.json evaluated {checkpoint.name} at {evaluation.get('checkpoint_steps')} steps"
    if int(evaluation.get("checkpoint_steps", -1)) != int(meta.get("steps_done", -2)):
        raise UserError(f"{evaluated}, but its metadata says the run now has {meta.get('steps_done')}; evaluate it "
                        "again before packaging.")
    if evaluation.get("checkpoint_sha256", digest) != digest:
        raise UserError(f"{evaluated}, but {checkpoint.name} is another file now (its SHA-256 is not the one "
                        "evaluated); evaluate it again before packaging.")
    files = {checkpoint.name: checkpoint, meta_path.name: meta_path}
    for snapshot in snapshot_paths(checkpoint):
        files[snapshot.name] = snapshot
    recorded: dict[str, str] = meta["sha256"] if isinstance(meta.get("sha256"), dict) else {}
    for name, path in files.items():
        if name in recorded and (digest if path == checkpoint else sha256_file(path)) != recorded[name]:
            raise UserError(f"{path} differs from the SHA-256 its metadata recorded when it was written (changed "
                            "since, or a crash between the two writes); --resume the run, or drop the file.")
    for name in list(files):
        if name.endswith(".zip"):
            eval_json = RunPaths.eval_result_of(root, Path(name))
            if eval_json.is_file():
                files[eval_json.name] = eval_json
    # eval --video lists {"file": <relative to the artifact root>, ...}; any others of this run are in results/videos/
    listed: list[Any] = evaluation["videos"] if isinstance(evaluation.get("videos"), list) else []
    videos = {Path(v) if Path(v).is_absolute() else root / v
              for v in (entry.get("file") if isinstance(entry, dict) else entry for entry in listed)
              if isinstance(v, str)}
    videos |= set(RunPaths.videos_of(root, stem))
    for video in sorted(v for v in videos if v.is_file()):
        files[f"videos/{video.name}"] = video
    for events in tensorboard_event_files(run_dir):  # `tensorboard --logdir`, the loss-phases figure
        files[f"tensorboard/{events.name}"] = events
    licence = licence_file()
    if licence is not None:
        files[licence.name] = licence
    return files


def export_scalars_csv(run_dir: Path, target: Path) -> dict[str, int]:
    """Every scalar of a TensorBoard folder (all its event files) as CSV; returns points per tag."""
    counts = {}
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag", "step", "wall_time", "value"])
        for tag, events in read_scalar_events(run_dir).items():
            counts[tag] = len(events)
            writer.writerows([tag, e.step, f"{e.wall_time:.3f}", repr(float(e.value))] for e in events)
    return counts


def write_release(out: Path, files: dict[str, Path], run_dir: Path, stem: str,
                  card: Callable[[dict[str, int], dict[str, int]], str]) -> dict[str, str]:
    """Copy ``files`` into ``out``, add the scalars CSV, the model card ``card(sizes, scalar_counts)`` and
    ``SHA256SUMS``; the folder appears whole or not at all. Returns the ``SHA256SUMS`` entries."""
    if out.exists() and not (out.is_dir() and (out / SHA256SUMS_NAME).is_file()):
        raise UserError(f"{out} already exists and is not a release folder; pass another --out (an earlier "
                        "release there would be replaced).")
    try:
        with atomic_replace(out) as tmp:
            tmp.mkdir(parents=True)
            for name, source in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, tmp / name)
            scalars = export_scalars_csv(run_dir, tmp / f"{stem}_scalars.csv")
            sizes = {name: (tmp / name).stat().st_size for name in [*files, f"{stem}_scalars.csv"]}
            (tmp / "README.md").write_text(card(sizes, scalars))
            write_sha256sums(tmp, [*sizes, "README.md"])
    except OSError as exc:
        raise UserError(f"Cannot write the release {out} ({exc.strerror or exc}); free space there or pass "
                        "another --out.") from None
    return read_sha256sums(out / SHA256SUMS_NAME)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _card_front_matter(meta: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """The Hugging Face model-card metadata block (library, tags, the success rate as a model-index result)."""
    env_id = meta["env_id"]
    return "\n".join([
        "---",
        "library_name: stable-baselines3",
        "tags:",
        *[f"- {tag}" for tag in ("reinforcement-learning", "robotics", "stable-baselines3", "sac",
                                 "hindsight-experience-replay", env_id)],
        "model-index:",
        f"- name: SAC+HER {meta.get('tag')}",
        "  results:",
        "  - task:",
        "      type: reinforcement-learning",
        "      name: reinforcement-learning",
        "    dataset:",
        f"      type: {env_id}",
        f"      name: {env_id}",
        "    metrics:",
        "    - type: success_rate",
        f"      value: {float(evaluation['success_rate']):.4f}",
        f"      name: deterministic success rate ({evaluation['n_episodes']} episodes)",
        "---",
    ])


def _snapshot_rows(meta: dict[str, Any], evaluation: dict[str, Any], sizes: dict[str, int],
                   snapshot_evals: dict[str, dict[str, Any]]) -> list[str]:
    """One table row per checkpoint in the release: its steps, its evaluation (if any) and how to evaluate it."""
    rows = []
    for name in [name for name in sizes if name.endswith(".zip")]:
        match = PERIODIC_RE.match(name.removesuffix(".zip"))
        steps = match["steps"] if match else format_steps(int(meta.get("steps_done", 0)))
        result = snapshot_evals.get(name) or (evaluation if name == f"{evaluation['name']}.zip" else None)
        success = (f"{result['success_rate']:.2f} ({result['success_ci95'][0]:.2f}-{result['success_ci95'][1]:.2f}, "
                   f"{result['n_episodes']} episodes)" if result else "not evaluated")
        flag = f" --steps {steps}" if match else ""
        rows.append(f"| `{name}` | {steps} | {success} | `eval --from-release URL{flag}` |")
    return rows


def _observation(meta: dict[str, Any]) -> str:
    """What the policy observes, in words."""
    if meta.get("observation") == "state":
        state_dim = FETCH_REACH_OBS_DIM if meta["env_id"].startswith("FetchReach") else FETCH_OBS_DIM
        return f"the {state_dim}-D state vector"
    return (f"{meta.get('image_size')}x{meta.get('image_size')} camera pixels, {meta.get('frame_stack')} frames "
            f"stacked, {PROPRIO_DIM}-D proprioception")


def _relabelling(config: dict[str, Any]) -> str:
    """HER's relabelling as the run was configured (k relabelled goals per transition; 0 turns it off)."""
    n_sampled_goal = config.get("her_n_sampled_goal")
    if n_sampled_goal == 0:
        return "no HER relabelling"
    if n_sampled_goal is None:
        return "HER 'future' relabelling"
    return f"HER 'future' relabelling ({n_sampled_goal} relabelled goals per transition)"


def model_card(meta: dict[str, Any], evaluation: dict[str, Any], sizes: dict[str, int], scalars: dict[str, int],
               snapshot_evals: dict[str, dict[str, Any]], train_command: str, licence: str | None) -> str:
    """The release's README.md: what a reader needs before downloading, and how to check and evaluate it."""
    stem, env_id = evaluation["name"], meta["env_id"]
    rate, (low, high) = float(evaluation["success_rate"]), evaluation["success_ci95"]
    versions, sessions = meta.get("versions", {}), meta.get("sessions", [])
    devices = sorted({str(s.get("device")) for s in sessions if isinstance(s, dict) and s.get("device")})
    gpu = versions.get("gpu") or "no GPU visible to torch (CPU)"
    peak = meta.get("gpu_memory_peak_bytes")
    commit = meta.get("git", {}) or {}
    config = meta.get("config", {})
    policy = meta.get("policy", {})
    files_rows = [f"| `{name}` | {size:,} |" for name, size in sizes.items()]
    licence_text = (f"The repository this run was trained from is licensed as its `{licence}` file says; that file "
                    "is part of this release." if licence else
                    "The repository this run was trained from sets no licence (it has no LICENSE file), so none is "
                    "granted here; the publisher should add one before uploading.")
    return "\n".join([
        _card_front_matter(meta, evaluation),
        "",
        f"# {stem}: SAC + HER on {env_id}",
        "",
        f"**Loading this model runs code.** {LOADING_RUNS_CODE}",
        "",
        "| | |",
        "|---|---|",
        f"| task | `{env_id}` (gymnasium-robotics), sparse reward, {_relabelling(config)}; "
        f"observes {_observation(meta)} |",
        f"| configuration | tag `{meta.get('tag')}`, seed {meta.get('seed')}; policy `{policy.get('policy')}`, "
        f"encoder `{policy.get('features_extractor')}`, replay `{policy.get('replay_buffer')}` |",
        f"| steps | {int(meta.get('steps_done', 0)):,} env steps trained (of {int(config.get('total_steps', 0)):,} "
        "asked for) |",
        f"| success rate | **{rate:.2f}** (95% CI {low:.2f}-{high:.2f}, {evaluation.get('ci_method')}; "
        f"{evaluation['n_episodes']} deterministic episodes from eval seed {evaluation.get('eval_seed')}) |",
        f"| mean final goal distance | {float(evaluation.get('mean_final_goal_distance', float('nan'))):.3f} m |",
        f"| hardware | {gpu}; devices: {', '.join(devices) or 'not recorded'}"
        + (f"; peak GPU memory {peak / 1e9:.1f} GB" if isinstance(peak, (int, float)) else "") + " |",
        f"| wall time | {_duration(float(meta.get('wall_time_s', 0.0)))} over {len(sessions)} session(s); "
        f"{meta.get('steps_per_s')} env steps/s in the last session |",
        f"| software | torch {versions.get('torch')}, stable-baselines3 {versions.get('stable-baselines3')}, "
        f"gymnasium {versions.get('gymnasium')}, gymnasium-robotics {versions.get('gymnasium-robotics')}, "
        f"mujoco {versions.get('mujoco')}, Python {versions.get('python')}; commit `{commit.get('commit')}`"
        + (" (with uncommitted changes)" if commit.get("dirty") else "") + " |",
        "",
        "## Check and evaluate it",
        "",
        "With the chapter's code (`scripts/ch09_pixel_push.py`; `URL` is this folder's address, or the folder "
        "itself once downloaded), every download is checked against `SHA256SUMS` before anything is unpickled:",
        "",
        "```bash",
        "sha256sum -c SHA256SUMS                      # a downloaded copy of this folder",
        f"python scripts/ch09_pixel_push.py eval --from-release URL --n-episodes {evaluation['n_episodes']} "
        f"--seed {evaluation.get('eval_seed')}",
        "```",
        "",
        "| checkpoint | steps | success rate (95% CI) | evaluate |",
        "|---|---|---|---|",
        *_snapshot_rows(meta, evaluation, sizes, snapshot_evals),
        "",
        f"`python scripts/ch09_pixel_push.py aggregate results/{stem}*_eval.json` turns the evaluated snapshots "
        "into success against steps.",
        "",
        "## Train it yourself",
        "",
        "```bash",
        f"python scripts/ch09_pixel_push.py {train_command}",
        "```",
        "",
        f"The full configuration, versions and sessions are in `{stem}.meta.json`; the TensorBoard curves "
        f"({len(scalars)} tags: {', '.join(sorted(scalars))}) in `{stem}_scalars.csv` as `tag,step,wall_time,value`, "
        "and as event files in `tensorboard/` (`tensorboard --logdir tensorboard`, or "
        "`python scripts/ch09_figures.py loss-phases --run tensorboard`).",
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *files_rows,
        "",
        "## Licence",
        "",
        licence_text,
        "",
    ])


def package_run(checkpoint: Path, meta_path: Path, meta: dict[str, Any], evaluation: dict[str, Any], root: Path,
                out: Path, train_command: str) -> dict[str, str]:
    """Write the release folder of the run whose final model is ``checkpoint``; returns its ``SHA256SUMS``."""
    stem = checkpoint.name.removesuffix(".zip")
    tensorboard_dir = meta.get("tensorboard_dir")
    if not isinstance(tensorboard_dir, str):
        raise UserError(f"The metadata {meta_path} names no TensorBoard folder (tensorboard_dir); was it written by "
                        "this script's train?")
    run_dir = root / tensorboard_dir
    if not tensorboard_event_files(run_dir):
        raise UserError(f"No TensorBoard events in {run_dir}; package needs the run's folder under runs/ (pass "
                        "--artifact-root if the run lives elsewhere).")
    files = release_files(checkpoint, meta_path, meta, evaluation, root, run_dir)
    snapshot_evals = {}
    for name in [n for n in files if n.endswith("_eval.json") and n != f"{stem}_eval.json"]:
        try:
            data = json.loads(files[name].read_text())
            if not isinstance(data, dict) or data.get("format") != EVAL_FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else type(data).__name__}")
        except (ValueError, OSError) as exc:
            print(f"[package] leaving out {files.pop(name)}: not an eval result of this script ({exc})")
            continue
        snapshot_evals[name.removesuffix("_eval.json") + ".zip"] = data
    licence = licence_file()

    def card(sizes: dict[str, int], scalars: dict[str, int]) -> str:
        return model_card(meta, evaluation, sizes, scalars, snapshot_evals, train_command,
                          licence.name if licence else None)

    return write_release(out, files, run_dir, stem, card)
