"""``ch09_pixel_push.py selftest``, the check a reader runs before a multi-day run (``scripts/ch09/selftest.py``).

The subcommand runs for real on the CPU path: real rendering through EGL, real SB3 and FastSAC training, the real
memory preflight, with short timing windows. One run serves every end-to-end assertion; its ``--buffer-size``
cannot fit, so it also shows that a failed check ends in exit code 1 while the other checks still run.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch as th

from ch09.selftest import (
    BF16_LOSS_ATOL,
    BF16_LOSS_RTOL,
    COMPARED_LOSSES,
    CheckResult,
    check_graph_status,
    compare_losses,
    exit_status,
)

UNFIT_BUFFER = 10**12
"""Transitions no machine holds (21 PB of frames): the memory check must fail."""
QUICK = ("--device", "cpu", "--render-seconds", "1", "--speed-seconds", "1")


@pytest.fixture(scope="module")
def unfit_run(production, tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest") / "selftest.json"
    proc = production.run("selftest", *QUICK, "--buffer-size", str(UNFIT_BUFFER), "--overlap-collection",
                          "--frames-in-ram", "--n-envs", "3", "--out", str(out), timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None


def table_row(stdout: str, check: str) -> str:
    rows = [line for line in stdout.splitlines() if line.strip("│ ").startswith(check + " ")]
    assert len(rows) == 1, f"want one table row for {check!r} in:\n{stdout}"
    return rows[0]


def test_selftest_on_a_cpu_prints_one_table_one_skip_line_and_exits_1_for_the_check_that_failed(unfit_run):
    proc, report = unfit_run
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    expected = {"device": "pass", "renderer": "pass", "replay memory": "fail", "bf16 vs fp32 losses": "pass",
                "captured == eager": "skip", "speed sample": "pass", "Experiment Card time (5M steps)": "skip"}
    for check, status in expected.items():
        assert f" {status} " in table_row(out, check)
    assert out.count("ch09 selftest on cpu") == 1  # the table's title: one table
    skip_lines = [line for line in out.splitlines() if line.startswith("skipped:")]
    assert len(skip_lines) == 1
    assert "captured == eager (no CUDA device" in skip_lines[0] and "Experiment Card time" in skip_lines[0]
    assert "1 failed" in out.splitlines()[-1]

    assert report is not None and report["format"] == "ch09-selftest-v1" and report["passed"] is False
    assert report["complete"] is True
    assert {c["name"]: c["status"] for c in report["checks"]} == expected
    assert report["skipped"] == skip_lines[0]
    for package in ("python", "torch", "stable-baselines3", "gymnasium", "mujoco"):
        assert report["versions"][package] not in ("", "not installed")
    assert report["device"]["device"] == "cpu" and report["device"]["ram_free_bytes"] > 0
    checks = {c["name"]: c for c in report["checks"]}
    memory = checks["replay memory"]
    assert f"{UNFIT_BUFFER:,}" in memory["summary"] and "does not fit" in memory["summary"]
    renderer = checks["renderer"]["figures"]
    assert renderer["frame_shape"] == [12, 84, 84] and renderer["frame_dtype"] == "uint8"
    assert renderer["render_size"] == [84, 84] and renderer["steps_per_s"] > 0
    assert renderer["mujoco_gl"] == "egl" and not renderer["gl_renderer"].startswith("unknown")
    assert renderer["gl_renderer"] in table_row(out, "renderer")
    losses = checks["bf16 vs fp32 losses"]["figures"]
    assert 0 <= losses["worst_fraction_of_bound"] <= 1 and len(losses["fp32_losses"]) == losses["updates"] > 1
    speed = checks["speed sample"]["figures"]
    assert set(speed["env_steps_per_s"]) == {"state-sb3", "state-fast"}
    assert speed["speedup"] is None and "x)" not in table_row(out, "speed sample")  # no CPU ratio: it misleads
    assert speed["n_envs"] == 3  # its random steps finish an episode per env before SB3's HER buffer samples
    overlapped = {run: measured["overlap"] for run, measured in speed["measurements"].items()}
    assert overlapped == {"state-sb3": False, "state-fast": True}  # the flag reaches FastSAC's run only
    assert speed["frames_in_ram"] and not any(m["frames_in_ram"] for m in speed["measurements"].values())  # no frames
    assert all(rate > 0 for rate in speed["env_steps_per_s"].values())


def test_a_renderer_that_cannot_start_fails_its_row_and_skips_what_needs_mujoco(production, tmp_path):
    """MUJOCO_GL=osmesa fails on these machines (as in test_pixel_wrapper): the table says why, no traceback."""
    out = tmp_path / "selftest.json"
    proc = production.run("selftest", *QUICK, "--out", str(out), MUJOCO_GL="osmesa", PYOPENGL_PLATFORM="osmesa",
                          timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert " fail " in table_row(proc.stdout, "renderer") and "MUJOCO_GL=osmesa" in proc.stdout
    statuses = {c["name"]: c["status"] for c in json.loads(out.read_text())["checks"]}
    assert statuses.pop("device") == "pass" and statuses.pop("renderer") == "fail"
    assert set(statuses.values()) == {"skip"}


def test_a_selftest_stopped_mid_check_leaves_the_report_of_the_checks_before(monkeypatch, tmp_path, capsys):
    """Each check rewrites the report as it ends: a Ctrl-C (or a kill, a hang) in the training check leaves the
    device, renderer and memory results, marked incomplete, and a progress line per finished check."""
    import ch09.selftest as selftest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selftest, "check_precisions", interrupted)
    out = tmp_path / "selftest.json"
    config = selftest.SelftestConfig(device="cpu", render_seconds=0.5, speed_seconds=1, out=out)
    with pytest.raises(KeyboardInterrupt):
        selftest.run_selftest(config)
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["passed"] is None
    assert [c["name"] for c in report["checks"]] == ["device", "renderer", "replay memory"]
    assert report["checks"][1]["figures"]["frame_shape"] == [12, 84, 84]
    printed = capsys.readouterr().out
    assert "[selftest] renderer: pass" in printed and "bf16 vs fp32 losses:" not in printed


def fp32_losses(updates: int = 4) -> list[dict[str, float]]:
    return [{key: 1.0 + 0.1 * step for key in COMPARED_LOSSES} for step in range(updates)]


@pytest.mark.parametrize("factor, passes", [(1 + BF16_LOSS_RTOL / 2, True), (1 + 2 * BF16_LOSS_RTOL, False)])
def test_bf16_losses_pass_within_the_bound_and_fail_beyond_it(factor, passes):
    reference = fp32_losses()
    candidate = [dict(step) for step in reference]
    candidate[2]["train/actor_loss"] *= factor
    result = compare_losses(reference, candidate)
    assert (result.status == "pass") == passes
    assert result.figures["worst_loss"] == "train/actor_loss" and result.figures["worst_step"] == 2


def test_a_non_finite_bf16_loss_fails():
    candidate = fp32_losses()
    candidate[1]["train/critic_loss"] = math.nan
    result = compare_losses(fp32_losses(), candidate)
    assert result.status == "fail" and "critic_loss at update 2" in result.summary


def test_a_loss_that_starts_at_zero_is_judged_by_the_absolute_slack():
    reference = [{key: 0.0 for key in COMPARED_LOSSES}]  # the entropy-coefficient loss of the first update
    within = [{key: BF16_LOSS_ATOL / 2 for key in COMPARED_LOSSES}]
    beyond = [{key: 2 * BF16_LOSS_ATOL for key in COMPARED_LOSSES}]
    assert compare_losses(reference, within).status == "pass"
    assert compare_losses(reference, beyond).status == "fail"


@pytest.mark.parametrize("state, reason, late, want", [
    ("captured", None, 1e-6, "pass"),
    ("captured", None, 0.5, "fail"),  # verified at the capture, wrong later
    ("captured", None, math.inf, "fail"),  # a later replay gave a non-finite value
    ("fallback", "replay differs from the eager step by 3e-2", None, "fail"),
    ("warming-up", None, None, "fail"),
    ("off", "--no-cuda-graph", None, "skip"),
])
def test_the_graph_check_passes_only_a_captured_step_whose_later_replay_still_matches(state, reason, late, want):
    model = SimpleNamespace(graph_status=SimpleNamespace(state=state, reason=reason, max_deviation=1e-6),
                            precision="fp32", replay_deviation=lambda: late)
    result = check_graph_status(model, th.device("cuda"))
    assert result.status == want and result.figures["state"] == state
    if reason:
        assert reason in result.summary
    if state == "captured":
        assert result.figures["late_replay_deviation"] == (late if math.isfinite(late) else None)  # JSON: null
        assert ("non-finite" in result.summary) == (late == math.inf)
        assert ("--no-cuda-graph" in result.summary) == (want == "fail")
    assert check_graph_status(model, th.device("cpu")).status == "skip"
    assert check_graph_status(SimpleNamespace(), th.device("cuda")).status == "fail"  # an engine without it


def test_exit_status_is_1_only_when_a_check_failed():
    passed, skipped, failed = (CheckResult("x", status, "") for status in ("pass", "skip", "fail"))
    assert exit_status([passed, skipped]) == 0
    assert exit_status([passed, failed, skipped]) == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--n-envs", "0"], "--n-envs must be at least 1"),
    (["--speed-seconds", "0"], "--speed-seconds"),
])
def test_bad_selftest_flags_are_one_sentence_and_exit_2(cli, argv, fragment):
    code, _out, err = cli.run("selftest", "--device", "cpu", *argv)
    cli.assert_user_error(code, err, fragment)


def test_an_out_that_is_a_folder_is_refused(cli, tmp_path):
    code, _out, err = cli.run("selftest", "--device", "cpu", "--out", str(tmp_path))
    cli.assert_user_error(code, err, "is a folder")
