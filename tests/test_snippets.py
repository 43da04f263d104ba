"""The book pulls code regions out of the lab files: every needed region must be present and well-formed."""

import subprocess
import sys
from pathlib import Path

import pytest

import snippets

REPO_ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = REPO_ROOT / "scripts" / "snippets.py"


def run_snippets(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SNIPPETS), *args], capture_output=True, text=True, timeout=60)


def write_lab(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_manifest_lists_the_17_regions_of_the_five_labs():
    manifest = snippets.load_manifest()
    assert len(manifest) == 5
    assert sum(len(names) for names in manifest.values()) == 17


def test_real_lab_files_pass_check():
    manifest = snippets.load_manifest()
    all_labs_exist = all((snippets.LABS_DIR / name).exists() for name in manifest)
    args = ["check"] if all_labs_exist else ["check", "--existing-only"]
    result = run_snippets(*args)
    assert result.returncode == 0, result.stderr


def test_all_five_labs_exist_so_the_full_manifest_is_checked():
    missing = [name for name in snippets.load_manifest() if not (snippets.LABS_DIR / name).exists()]
    assert not missing, f"lab files missing: {missing}"


def test_extract_writes_dedented_regions_without_markers(tmp_path):
    labs = tmp_path / "labs"
    write_lab(labs, "demo_lab.py", (
        "import torch\n"
        "# --8<-- [start:outer]\n"
        "class Outer:\n"
        "    # --8<-- [start:inner_method]\n"
        "    def inner(self):\n"
        "        return 1\n"
        "    # --8<-- [end:inner_method]\n"
        "# --8<-- [end:outer]\n"
    ))
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"labs": {"demo_lab.py": ["outer", "inner_method"]}}')
    out = tmp_path / "out"
    result = run_snippets("--labs-dir", str(labs), "--manifest", str(manifest), "extract", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "demo_lab" / "outer.py").read_text() == "class Outer:\n    def inner(self):\n        return 1\n"
    assert (out / "demo_lab" / "inner_method.py").read_text() == "def inner(self):\n    return 1\n"


@pytest.mark.parametrize(
    "text, expected_line, expected_fragment",
    [
        ("# --8<-- [start:a]\nx = 1\n", 1, "region 'a': start marker is never closed"),
        ("x = 1\n# --8<-- [end:a]\n", 2, "region 'a': end marker without a matching start"),
        ("# --8<-- [start:a]\nx = 1\n# --8<-- [end:a]\n# --8<-- [start:a]\ny = 2\n# --8<-- [end:a]\n",
         4, "region 'a': duplicate name"),
        ("# --8<-- [start:a]\n# --8<-- [start:b]\nx = 1\n# --8<-- [end:a]\n# --8<-- [end:b]\n",
         4, "regions must nest, not overlap"),
        ("# --8<-- [start:Bad-Name]\nx = 1\n# --8<-- [end:Bad-Name]\n", 1, "invalid name"),
        ("# --8<-- [begin:a]\nx = 1\n", 1, "malformed snippet marker"),
    ],
    ids=["unclosed", "unopened", "duplicate", "overlap", "bad-name", "malformed"],
)
def test_broken_regions_name_file_line_and_region(tmp_path, text, expected_line, expected_fragment):
    labs = tmp_path / "labs"
    path = write_lab(labs, "broken_lab.py", text)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"labs": {}}')
    result = run_snippets("--labs-dir", str(labs), "--manifest", str(manifest), "check")
    assert result.returncode == 1
    assert f"{path}:{expected_line}:" in result.stderr
    assert expected_fragment in result.stderr


def test_missing_manifest_region_is_reported(tmp_path):
    labs = tmp_path / "labs"
    path = write_lab(labs, "lab.py", "# --8<-- [start:present]\nx = 1\n# --8<-- [end:present]\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"labs": {"lab.py": ["present", "absent"], "other_lab.py": ["thing"]}}')
    result = run_snippets("--labs-dir", str(labs), "--manifest", str(manifest), "check")
    assert result.returncode == 1
    assert f"{path}: region 'absent': missing" in result.stderr
    assert "other_lab.py: lab file is missing" in result.stderr
    assert "'present'" not in result.stderr
