"""Tests of the checkpoint track: ``package`` a run, then ``eval`` it from its release, safely.

One tiny real run (full-state FetchReach-v4, 300 env steps, a snapshot every 100) is trained once for the module,
evaluated from its local files and packaged. Its release folder is then served over HTTP by a server on
127.0.0.1 in a thread (Range requests like a real file host, and on demand a server that closes the connection
mid-file), and evaluated from there in-process through ``main(argv)``: the same success rate as the local file.
Every refusal (a tampered zip, a wrong --sha256, a download that keeps breaking off) must be ONE line starting
with "error:", exit code 2, happen before anything is unpickled, and leave no file under its final name.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import pathlib
import pickle
import shutil
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ch09_pixel_push as pixel_push
import pytest

from ch09.run import release
from ch09.run.checkpoints import load_for_acting

STEM = "ch09_fullstate_FetchReach-v4_seed0"
EVAL_FLAGS = ("--n-episodes", "3", "--device", "cpu")
"""Three deterministic 50-step episodes: enough to compare two evaluations episode by episode."""


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------



def sha256_of(path: Path) -> str:
    """An independent digest (hashlib on the whole file), to check SHA256SUMS without the code under test."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def episodes_of(result: dict[str, Any]) -> list[tuple[bool, float]]:
    return [(e["success"], e["final_goal_distance"]) for e in result["episodes"]]


def final_names(folder: Path) -> set[str]:
    """Files in a download folder under a final name (no .part)."""
    return {p.name for p in folder.iterdir() if not p.name.endswith(release.PART_SUFFIX)} if folder.is_dir() else set()


@dataclass
class ReleaseServer:
    """A folder served on 127.0.0.1 by a thread, as a file host serves a release: GET with Range requests.

    ``cut_zips``: how many times each .zip is cut off halfway (headers promise the whole file, then the
    connection closes); ``honour_range`` False: a server that always sends the whole file from byte 0.
    """

    folder: Path
    cut_zips: int = 0
    honour_range: bool = True
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)
    cuts: dict[str, int] = field(default_factory=dict)

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
                name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
                path = served.folder / name
                range_header = self.headers.get("Range")
                if not path.is_file():
                    served.requests.append((name, range_header, 404))
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header else 0
                if not served.honour_range:
                    start = 0
                if start >= len(data) > 0:
                    served.requests.append((name, range_header, 416))
                    self.send_error(416)
                    return
                status = 206 if start else 200
                served.requests.append((name, range_header, status))
                self.send_response(status)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name.endswith(".zip") and served.cuts.get(name, 0) < served.cut_zips:
                    served.cuts[name] = served.cuts.get(name, 0) + 1
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True  # closes mid-file: the client got half of what was promised
                    return
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> ReleaseServer:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retries are real; only the pause between them is skipped."""
    monkeypatch.setattr(release, "RETRY_DELAY_S", 0.0)


# ------------------------------------------------------------------------------------------------------
# the run, its local evaluations and its release: made once for the module
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, production) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("release_run")
    production.check("train", "--env", "FetchReach-v4", "--total-steps", "300", *production.STATE_BUDGET,
                     "--artifact-root", str(root))
    checkpoints = root / "checkpoints"
    local = {}
    for name in (f"{STEM}.zip", f"{STEM}_200_steps.zip"):
        assert pixel_push.main(["eval", "--checkpoint", str(checkpoints / name), *EVAL_FLAGS,
                          "--artifact-root", str(root)]) == 0
        local[name] = json.loads((root / "results" / f"{name.removesuffix('.zip')}_eval.json").read_text())
    assert pixel_push.main(["package", "--checkpoint", str(checkpoints / f"{STEM}.zip")]) == 0
    return {"root": root, "checkpoints": checkpoints, "release": root / "releases" / STEM, "local": local}


def test_package_writes_a_complete_release(run: dict[str, Any], tensorboard_scalars) -> None:
    folder = run["release"]
    sums = dict(reversed(line.split("  ", 1)) for line in (folder / "SHA256SUMS").read_text().splitlines())
    zips = {f"{STEM}.zip", *(f"{STEM}_{n}_steps.zip" for n in (100, 200, 300))}
    events = {name for name in sums if name.startswith("tensorboard/events.out.tfevents")}
    assert events and zips | {f"{STEM}.meta.json", f"{STEM}_eval.json", f"{STEM}_200_steps_eval.json",
                              f"{STEM}_scalars.csv", "README.md"} == set(sums) - events
    assert {p.name for p in folder.iterdir()} == set(sums) - events | {"SHA256SUMS", "tensorboard"}
    for name, digest in sums.items():
        assert sha256_of(folder / name) == digest, name

    # Each checkpoint's digest was recorded in its metadata when it was written, and the release holds that file.
    meta = json.loads((run["checkpoints"] / f"{STEM}.meta.json").read_text())
    assert {name: sha256_of(run["checkpoints"] / name) for name in zips} == meta["sha256"]
    assert all(sums[name] == meta["sha256"][name] for name in zips)

    # The CSV holds every TensorBoard point, as TensorBoard itself reads the run.
    scalars = tensorboard_scalars(run["root"] / "runs/ch09_fullstate/FetchReach-v4/seed0")
    rows = (folder / f"{STEM}_scalars.csv").read_text().splitlines()
    assert rows[0] == "tag,step,wall_time,value"
    assert len(rows) - 1 == sum(len(points) for points in scalars.values())
    critic = [row.split(",") for row in rows[1:] if row.startswith("train/critic_loss,")]
    assert [(int(step), float(value)) for _, step, _, value in critic] == \
        [(step, pytest.approx(value)) for step, value in scalars["train/critic_loss"]]

    card = (folder / "README.md").read_text()
    result = run["local"][f"{STEM}.zip"]
    low, high = result["success_ci95"]
    assert card.startswith("---\nlibrary_name: stable-baselines3\n")
    assert f"**{result['success_rate']:.2f}** (95% CI {low:.2f}-{high:.2f}" in card
    assert "Loading this model runs code" in card and "300 env steps trained" in card
    assert "train --env FetchReach-v4 --total-steps 300 --full-state" in card
    assert "--steps 200" in card and ("Licence" in card)
    assert "observes the 10-D state vector" in card  # FetchReach's state (Push's is 25-D)
    assert "relabelled goals per transition)" in card and "env steps/s in the last session |" in card


def test_eval_from_a_served_release_equals_the_local_file(cli, run: dict[str, Any], tmp_path: Path) -> None:
    with ReleaseServer(run["release"]) as server:
        for steps, name in ((None, f"{STEM}.zip"), ("200", f"{STEM}_200_steps.zip")):
            code, out, err = cli.run("eval", "--from-release", server.url + "/",
                                      *(["--steps", steps] if steps else []), *EVAL_FLAGS,
                                      "--artifact-root", str(tmp_path))
            assert code == 0, err
            assert "SHA-256 verified" in out
            downloaded = tmp_path / "checkpoints" / name
            assert sha256_of(downloaded) == sha256_of(run["checkpoints"] / name)
            result = json.loads((tmp_path / "results" / f"{name.removesuffix('.zip')}_eval.json").read_text())
            local = run["local"][name]
            assert result["success_rate"] == local["success_rate"]
            assert episodes_of(result) == episodes_of(local)
            assert result["checkpoint_sha256"] == local["checkpoint_sha256"]
    assert final_names(tmp_path / "checkpoints") == {f"{STEM}.zip", f"{STEM}_200_steps.zip", f"{STEM}.meta.json"}

    # The same release as a local folder: checked against its SHA256SUMS, evaluated in place.
    code, _, err = cli.run("eval", "--from-release", str(run["release"]), *EVAL_FLAGS,
                            "--artifact-root", str(tmp_path / "local"))
    assert code == 0, err
    result = json.loads((tmp_path / "local/results" / f"{STEM}_eval.json").read_text())
    assert episodes_of(result) == episodes_of(run["local"][f"{STEM}.zip"])


def test_a_tampered_zip_is_refused_before_loading(cli, run: dict[str, Any], tmp_path: Path) -> None:
    tampered = tmp_path / "tampered_release"
    shutil.copytree(run["release"], tampered)
    data = bytearray((tampered / f"{STEM}.zip").read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    (tampered / f"{STEM}.zip").write_bytes(bytes(data))

    downloads = tmp_path / "downloads"
    with ReleaseServer(tampered) as server:
        code, _, err = cli.run("eval", "--from-release", server.url, *EVAL_FLAGS,
                                "--artifact-root", str(downloads))
    cli.assert_user_error(code, err, "SHA-256", "not the published file", "was not loaded")
    assert f"{STEM}.zip" not in final_names(downloads / "checkpoints")
    assert not (downloads / "checkpoints" / f"{STEM}.zip{release.PART_SUFFIX}").exists()
    assert not (downloads / "results").exists()  # nothing was evaluated

    code, _, err = cli.run("eval", "--from-release", str(tampered), *EVAL_FLAGS,
                            "--artifact-root", str(downloads))
    cli.assert_user_error(code, err, "SHA-256", "not the published file")


def test_a_wrong_sha256_is_refused_before_loading(cli, run: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = run["checkpoints"] / f"{STEM}.zip"
    wrong = "0" * 64
    code, _, err = cli.run("eval", "--checkpoint", str(checkpoint), "--sha256", wrong, *EVAL_FLAGS,
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "SHA-256", "was not loaded")
    code, _, err = cli.run("eval", "--checkpoint", str(checkpoint), "--sha256", "abc", *EVAL_FLAGS,
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "--sha256", "64 hexadecimal")
    assert not (tmp_path / "results").exists()

    # A bare URL: without a SHA256SUMS beside it, only --sha256 can vouch for it.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (f"{STEM}.zip", f"{STEM}.meta.json"):
        shutil.copyfile(run["release"] / name, bare / name)
    downloads = tmp_path / "downloads"
    with ReleaseServer(bare) as server:
        url = f"{server.url}/{STEM}.zip"
        code, _, err = cli.run("eval", "--checkpoint", url, *EVAL_FLAGS, "--artifact-root", str(downloads))
        cli.assert_user_error(code, err, "No digest is known", "--sha256")
        assert not any(name == f"{STEM}.zip" for name, _, _ in server.requests)  # not even downloaded
        code, _, err = cli.run("eval", "--checkpoint", url, "--sha256", wrong, *EVAL_FLAGS,
                                "--artifact-root", str(downloads))
        cli.assert_user_error(code, err, "downloaded from", "not the published file")
        assert f"{STEM}.zip" not in final_names(downloads / "checkpoints")
        code, _, err = cli.run("eval", "--checkpoint", url, "--sha256", sha256_of(bare / f"{STEM}.zip"),
                                *EVAL_FLAGS, "--artifact-root", str(downloads))
        assert code == 0, err

    # --sha256 that contradicts the release's SHA256SUMS: refused before any download.
    with ReleaseServer(run["release"]) as server:
        code, _, err = cli.run("eval", "--from-release", server.url, "--sha256", wrong, *EVAL_FLAGS,
                                "--artifact-root", str(tmp_path / "other"))
        cli.assert_user_error(code, err, "--sha256", "differs from")
        assert not any(name.endswith(".zip") for name, _, _ in server.requests)


class TouchOnUnpickle:
    """What a malicious checkpoint could hold: unpickling it calls ``Path.touch(marker)`` (any call would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return pathlib.Path.touch, (self.marker,)


def test_loading_runs_code_and_the_digest_check_stops_it(cli, run: dict[str, Any], tmp_path: Path) -> None:
    """A zip whose pickled policy class runs code: loading it does (the threat is real); eval with the
    published digest refuses it before that."""
    original = run["checkpoints"] / f"{STEM}.zip"
    evil, marker = tmp_path / f"{STEM}.zip", tmp_path / "code_ran"
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(evil, "w") as target:
        for item in source.infolist():
            content = source.read(item)
            if item.filename == "data":
                data = json.loads(content)
                data["policy_class"][":serialized:"] = base64.b64encode(
                    pickle.dumps(TouchOnUnpickle(marker))).decode()
                content = json.dumps(data).encode()
            target.writestr(item, content)
    shutil.copyfile(run["checkpoints"] / f"{STEM}.meta.json", tmp_path / f"{STEM}.meta.json")

    code, _, err = cli.run("eval", "--checkpoint", str(evil), "--sha256", sha256_of(original), *EVAL_FLAGS,
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "not the published file", "was not loaded")
    assert not marker.exists()

    with pytest.raises(Exception):  # noqa: B017 (whatever SB3 makes of the result, the code has run)
        load_for_acting(evil)
    assert marker.exists()


def test_an_interrupted_download_resumes(cli, run: dict[str, Any], tmp_path: Path) -> None:
    with ReleaseServer(run["release"], cut_zips=2) as server:
        code, out, err = cli.run("eval", "--from-release", server.url, *EVAL_FLAGS,
                                  "--artifact-root", str(tmp_path))
    assert code == 0, err
    assert out.count("connection lost") == 2 and "SHA-256 verified" in out
    zip_requests = [(header, status) for name, header, status in server.requests if name == f"{STEM}.zip"]
    assert [status for _, status in zip_requests] == [200, 206, 206]  # resumed where each connection broke off
    assert sha256_of(tmp_path / "checkpoints" / f"{STEM}.zip") == sha256_of(run["checkpoints"] / f"{STEM}.zip")
    result = json.loads((tmp_path / "results" / f"{STEM}_eval.json").read_text())
    assert episodes_of(result) == episodes_of(run["local"][f"{STEM}.zip"])


def test_a_download_that_keeps_breaking_off_fails_in_one_sentence(cli, run: dict[str, Any], tmp_path: Path) -> None:
    with ReleaseServer(run["release"], cut_zips=99, honour_range=False) as server:
        code, _, err = cli.run("eval", "--from-release", server.url, *EVAL_FLAGS,
                                "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "broke off", "run the same command again")
    # The first connection brought half the file; then DOWNLOAD_ATTEMPTS in a row started over and got no further.
    assert sum(name == f"{STEM}.zip" for name, _, _ in server.requests) == release.DOWNLOAD_ATTEMPTS + 1
    assert final_names(tmp_path / "checkpoints") == {f"{STEM}.meta.json"}  # the zip only as .part


def test_a_served_sha256sums_too_large_to_be_one_is_refused_at_once(cli, run: dict[str, Any], tmp_path: Path) -> None:
    """Reading stops at the size limit: a 3 MB SHA256SUMS is no broken connection, and no retry can help."""
    served = tmp_path / "served"
    shutil.copytree(run["release"], served)
    (served / "SHA256SUMS").write_bytes(b"0" * 3_000_000)
    with ReleaseServer(served) as server:
        code, _, err = cli.run("eval", "--from-release", server.url, *EVAL_FLAGS, "--artifact-root",
                               str(tmp_path / "root"))
    cli.assert_user_error(code, err, "SHA256SUMS is larger than", "so it is not a SHA256SUMS")
    assert [name for name, _, _ in server.requests] == ["SHA256SUMS"]


@pytest.mark.parametrize("argv, fragments", [
    (["eval", "--n-episodes", "1"], ["--checkpoint PATH_OR_URL or --from-release"]),
    (["eval", "--checkpoint", "x.zip", "--steps", "1M"], ["--steps picks a snapshot of --from-release"]),
    (["eval", "--checkpoint", "s3://bucket/x.zip"], ["http(s) URLs only"]),
    (["eval", "--from-release", "/nonexistent/release"], ["is not a release folder"]),
    (["eval", "--from-release", "http://127.0.0.1:9/release"], ["Cannot reach"]),
])
def test_bad_checkpoint_sources_are_one_sentence(cli, argv: list[str], fragments: list[str], tmp_path: Path) -> None:
    code, _, err = cli.run(*argv, "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, *fragments)


def test_release_snapshots_and_package_refusals(cli, run: dict[str, Any], tmp_path: Path) -> None:
    code, _, err = cli.run("eval", "--from-release", str(run["release"]), "--steps", "1M",
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "no snapshot at 1M steps", "100, 200, 300")

    # package: a snapshot instead of the run, a run without its evaluation, an --out that is not a release.
    checkpoints = run["checkpoints"]
    code, _, err = cli.run("package", "--checkpoint", str(checkpoints / f"{STEM}_100_steps.zip"))
    cli.assert_user_error(code, err, "periodic snapshot", f"{STEM}.zip")
    code, _, err = cli.run("package", "--checkpoint", str(checkpoints / f"{STEM}.zip"),
                            "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "eval --checkpoint", "--n-episodes 100")
    code, _, err = cli.run("package", "--checkpoint", str(checkpoints / f"{STEM}.zip"),
                            "--out", str(checkpoints))
    cli.assert_user_error(code, err, "not a release folder", "--out")
    assert (checkpoints / f"{STEM}.zip").is_file()


@pytest.mark.parametrize("change", ["zip replaced", "metadata moved on"])
def test_package_refuses_an_evaluation_of_another_checkpoint(cli, run: dict[str, Any], change: str,
                                                            tmp_path: Path) -> None:
    """The eval JSON is of the step-300 zip: a zip swapped for the step-100 snapshot, or a run that has trained
    on since, is refused, each with the reason that holds."""
    root = tmp_path / "root"
    for folder in ("checkpoints", "results", "runs"):
        shutil.copytree(run["root"] / folder, root / folder)
    checkpoints = root / "checkpoints"
    if change == "zip replaced":
        shutil.copyfile(checkpoints / f"{STEM}_100_steps.zip", checkpoints / f"{STEM}.zip")
        fragments = [f"{STEM}.zip is another file now", "evaluate it again"]
    else:
        meta = json.loads((checkpoints / f"{STEM}.meta.json").read_text())
        (checkpoints / f"{STEM}.meta.json").write_text(json.dumps({**meta, "steps_done": 400}))
        fragments = ["evaluated", "at 300 steps", "the run now has 400", "evaluate it again"]
    code, _, err = cli.run("package", "--checkpoint", str(checkpoints / f"{STEM}.zip"), "--out",
                           str(tmp_path / "release"))
    cli.assert_user_error(code, err, *fragments)


def test_aggregate_over_snapshots_gives_success_against_steps(cli, run: dict[str, Any], tmp_path: Path) -> None:
    results = run["root"] / "results"
    files = [results / f"{STEM}_200_steps_eval.json", results / f"{STEM}_eval.json"]
    code, out, err = cli.run("aggregate", *map(str, files), "--artifact-root", str(tmp_path))
    assert code == 0, err
    summary = json.loads((tmp_path / "results/ch09_fullstate_FetchReach-v4_success_vs_steps.json").read_text())
    assert [row["steps"] for row in summary["rows"]] == [200, 300]
    assert [row["success_rate_mean"] for row in summary["rows"]] == \
        [run["local"][f"{STEM}_200_steps.zip"]["success_rate"], run["local"][f"{STEM}.zip"]["success_rate"]]
    assert "success against training steps" in out

    code, _, err = cli.run("aggregate", str(files[1]), str(files[1]), "--artifact-root", str(tmp_path))
    cli.assert_user_error(code, err, "same seed at the same step count")
