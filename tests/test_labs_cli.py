"""Each lab's `--verify` as a reader runs it: a fresh process, every claim passing, exit code 0.

The claims themselves also run in-process in each lab's own test file; this checks the command line around them.
(drqv2_sac_policy's command is tested in its own file, together with how it pickles its policy class.)
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

LABS_DIR = Path(__file__).resolve().parents[1] / "scripts" / "labs"
SUMMARY_RE = re.compile(r"^(\d+)/(\d+) claims passed$", re.MULTILINE)


@pytest.mark.parametrize("lab", ["pixel_wrapper", "visual_encoder", "manipulation_encoder", "image_augmentation"])
def test_verify_command_passes_every_claim(lab):
    result = subprocess.run(
        [sys.executable, str(LABS_DIR / f"{lab}.py"), "--verify"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = SUMMARY_RE.search(result.stdout)
    assert summary is not None, result.stdout[-2000:]
    assert int(summary[2]) > 0 and summary[1] == summary[2], summary[0]
    assert "FAIL" not in result.stdout
