"""Each lab's command line as a reader runs it (a fresh process), and the one helper every lab's main() uses.

The lab claims run here, once: `--verify` of every lab, and drqv2_sac_policy's `--bridge`, which prints its verify
claims, the probe and the match-criteria table in one run. The per-lab test files test only what no claim states.
"""

from __future__ import annotations

import re

import pytest

import drqv2_sac_policy
import pixel_wrapper
from lab_support import Claim, lab_main

SUMMARY_RE = re.compile(r"^(\d+)/(\d+) claims passed$", re.MULTILINE)


def assert_every_claim_passed(stdout: str) -> None:
    summary = SUMMARY_RE.search(stdout)
    assert summary is not None, stdout[-2000:]
    assert int(summary[2]) > 0 and summary[1] == summary[2], summary[0]
    assert not re.search(r"^FAIL ", stdout, re.MULTILINE), stdout[-4000:]


@pytest.mark.parametrize("lab", ["pixel_wrapper", "visual_encoder", "manipulation_encoder", "image_augmentation"])
def test_verify_command_passes_every_claim(lab_script, lab):
    result = lab_script.run(lab, "--verify")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert_every_claim_passed(result.stdout)
    assert "(--verify took" in result.stdout


def test_drqv2_bridge_command_passes_claims_probe_and_criteria(lab_script):
    result = lab_script.run("drqv2_sac_policy", "--bridge")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert_every_claim_passed(result.stdout)
    assert "probe: routing as expected" in result.stdout
    assert re.search(r"^bridge: (\d+)/\1 criteria met by DrQv2SACPolicy$", result.stdout, re.MULTILINE), result.stdout
    # Run as __main__, the lab re-imports itself by name, so SAC.save pickled the class by reference.
    assert "class drqv2_sac_policy.DrQv2SACPolicy" in result.stdout
    encoder_in_actor = next(line for line in result.stdout.splitlines()
                            if line.startswith("encoder in actor optimizer"))
    assert encoder_in_actor.split()[-2:] == ["8/8", "0/8"]  # the probe's table: SB3 shared, ours


# ---------------------------------------------------------------------------------------------------------
# lab_main, in-process: flags, help, errors (no env is built)
# ---------------------------------------------------------------------------------------------------------
def _claims() -> list[Claim]:
    """Two claims, one failing."""
    return [Claim("holds", True, "yes"), Claim("fails", False, "no")]


def _exit_code() -> int:
    """Return 7."""
    return 7


def test_lab_main_reports_claims_and_passes_exit_codes_through(capsys):
    assert lab_main("A lab.", {"verify": _claims, "other": _exit_code}, ["--verify"]) == 1
    out = capsys.readouterr().out
    assert "PASS  holds  (yes)" in out and "FAIL  fails  (no)" in out and "1/2 claims passed" in out
    assert lab_main("A lab.", {"verify": _claims, "other": _exit_code}, ["--other"]) == 7


def test_lab_main_without_a_mode_prints_the_help_with_each_mode(capsys):
    assert lab_main("A lab.\n\nMore text.", {"verify": _claims, "other": _exit_code}, []) == 0
    out = capsys.readouterr().out
    assert "A lab." in out and "More text." not in out
    assert "--verify" in out and "Two claims, one failing" in out and "--other" in out and "Return 7" in out


@pytest.mark.parametrize("argv, message", [
    (["--verify", "--other"], "error: --verify and --other cannot be given together"),
    (["--verfy"], "did you mean --verify?"),
])
def test_lab_main_refuses_bad_input_in_one_message(capsys, argv, message):
    assert lab_main("A lab.", {"verify": _claims, "other": _exit_code}, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_drqv2_options_are_checked_before_anything_runs(capsys):
    assert drqv2_sac_policy.main(["--demo", "--steps", "10"]) == 2
    assert "--steps must be at least" in capsys.readouterr().err
    assert drqv2_sac_policy.main(["--probe", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_drqv2_help_shows_modes_and_real_defaults(capsys):
    assert drqv2_sac_policy.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--verify", "--probe", "--bridge", "--demo", "--steps", "--threads"):
        assert flag in out
    assert f"default: {drqv2_sac_policy.DemoConfig.steps}" in out


def test_pixel_wrapper_main_is_lab_main(capsys):
    assert pixel_wrapper.main([]) == 0  # help, no env built
    assert "--verify" in capsys.readouterr().out
