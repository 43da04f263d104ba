"""The book pulls code regions out of the files under scripts/: every needed region present, well-formed, printable."""

import json
import subprocess
import sys
from pathlib import Path

import markdown
import pytest
import snippets
from pymdownx.snippets import SnippetMissingError

REPO_ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = REPO_ROOT / "scripts" / "snippets.py"


def run_snippets(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SNIPPETS), *args], capture_output=True, text=True, timeout=60)


def write_file(folder: Path, rel: str, text: str) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def check_tree(tmp_path: Path, capsys: pytest.CaptureFixture, files: dict[str, str],
               manifest: dict[str, list[str]] | None = None,
               command: tuple[str, ...] = ("check",)) -> tuple[int, str, str]:
    """Write `files` under tmp_path/scripts, run snippets.main on them in-process; return (exit code, out, err)."""
    scripts_dir = tmp_path / "scripts"
    scripts_dir.mkdir(exist_ok=True)
    for rel, text in files.items():
        write_file(scripts_dir, rel, text)
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps({"files": manifest or {}}))
    code = snippets.main(["--scripts-dir", str(scripts_dir), "--manifest", str(manifest_path), *command])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pymdownx_include(base: Path, rel: str, name: str) -> str:
    """What the book's build includes for ``--8<-- "rel:name"``: pymdownx's own snippets preprocessor, in the
    Markdown configuration the README documents ("Snippets for the book"), with ``base`` as base_path."""
    md = markdown.Markdown(extensions=["pymdownx.snippets"],
                           extension_configs={"pymdownx.snippets": {"base_path": [str(base)], "check_paths": True}})
    return "".join(line + "\n" for line in md.preprocessors["snippet"].run([f'--8<-- "{rel}:{name}"']))


def region(name: str, body: str, indent: str = "") -> str:
    return f"{indent}# --8<-- [start:{name}]\n{body}{indent}# --8<-- [end:{name}]\n"


def class_of(n_lines: int, name: str = "Big") -> str:
    """A class exactly `n_lines` long: the header plus `n_lines - 1` attribute lines."""
    return f"class {name}:\n" + "".join(f"    a{i} = {i}\n" for i in range(n_lines - 1))


# ---------------------------------------------------------------------------------------------------------------------
# The real tree
# ---------------------------------------------------------------------------------------------------------------------

def test_manifest_prints_regions_of_all_five_labs():
    manifest = snippets.load_manifest()
    labs = [f"labs/{lab}.py" for lab in (
        "pixel_wrapper", "manipulation_encoder", "image_augmentation", "visual_encoder", "drqv2_sac_policy")]
    assert [lab for lab in labs if not manifest.get(lab)] == []


def test_every_file_of_the_manifest_exists():
    missing = [rel for rel in snippets.load_manifest() if not (snippets.SCRIPTS_DIR / rel).is_file()]
    assert not missing, f"files missing: {missing}"


def test_every_region_renders_through_pymdownx_as_extracted(tmp_path):
    """The text pymdownx includes for each region of the tree equals what `snippets.py extract` writes, and fits
    the 80-column page as pymdownx prints it."""
    out = tmp_path / "out"
    result = run_snippets("extract", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    scanned = snippets.scan(snippets.SCRIPTS_DIR, snippets.load_manifest())
    names = [(rel, name) for rel, scanned_file in scanned.items() for name in scanned_file.regions]
    assert len(names) >= sum(len(regions) for regions in snippets.load_manifest().values())
    for rel, name in names:
        included = pymdownx_include(REPO_ROOT, f"scripts/{rel}", name)
        assert included == (out / Path(rel).stem / f"{name}.py").read_text(), f"{rel}:{name}"
        widest = max(len(line) for line in included.splitlines())
        assert widest <= snippets.BOOK_LINE_WIDTH, f"{rel}:{name} prints {widest} columns"


def test_repository_regions_fit_the_book():
    result = run_snippets("check")
    assert result.returncode == 0, result.stderr[-4000:]
    n_listed = sum(len(names) for names in snippets.load_manifest().values())
    assert f"snippet check passed: {n_listed} needed regions present" in result.stdout
    assert "not in the manifest" not in result.stdout, "a region in the tree that the manifest does not list"


# ---------------------------------------------------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------------------------------------------------

def test_extract_writes_regions_as_pymdownx_includes_them(tmp_path, capsys):
    """Markers (nested ones too) dropped, lines as they stand: pymdownx does not dedent by default."""
    text = (
        "import torch\n"
        "# --8<-- [start:outer]\n"
        "class Outer:\n"
        "    # --8<-- [start:inner_method]\n"
        "    def inner(self):\n"
        "        return 1\n"
        "    # --8<-- [end:inner_method]\n"
        "# --8<-- [end:outer]\n"
    )
    out = tmp_path / "out"
    code, stdout, err = check_tree(tmp_path, capsys, {"labs/demo_lab.py": text},
                                   {"labs/demo_lab.py": ["outer", "inner_method"]}, command=("extract", str(out)))
    assert code == 0, err
    assert "wrote 2 regions" in stdout
    for name, expected in [("outer", "class Outer:\n    def inner(self):\n        return 1\n"),
                           ("inner_method", "    def inner(self):\n        return 1\n")]:
        assert (out / "demo_lab" / f"{name}.py").read_text() == expected
        assert pymdownx_include(tmp_path, "scripts/labs/demo_lab.py", name) == expected


def test_marker_forms_are_read_as_pymdownx_reads_them(tmp_path, capsys):
    """`# -8<- [start:x]` is a marker for pymdownx, so here too; `# --8<--[start:x]` is none for pymdownx (it
    cannot find the region), so it is refused here rather than printed."""
    files = {"labs/short.py": "# -8<- [start:short_scissors]\nx = 1\n# -8<- [end:short_scissors]\n"}
    out = tmp_path / "out"
    code, _, err = check_tree(tmp_path, capsys, files, {"labs/short.py": ["short_scissors"]},
                              command=("extract", str(out)))
    assert code == 0, err
    assert (out / "short" / "short_scissors.py").read_text() == "x = 1\n"
    assert pymdownx_include(tmp_path, "scripts/labs/short.py", "short_scissors") == "x = 1\n"

    glued = {"labs/glued.py": "# --8<--[start:glued]\nx = 1\n# --8<--[end:glued]\n"}
    code, _, err = check_tree(tmp_path, capsys, glued)
    assert code == 1 and f"{tmp_path / 'scripts' / 'labs' / 'glued.py'}:1: malformed snippet marker" in err
    with pytest.raises(SnippetMissingError):
        pymdownx_include(tmp_path, "scripts/labs/glued.py", "glued")


def test_a_string_pymdownx_reads_as_a_marker_is_refused(tmp_path, capsys):
    """pymdownx reads every line, strings too: a docstring line that looks like a marker would cut the listing."""
    text = region("listing", 'def f():\n    """Mark it:\n    # --8<-- [end:listing]\n    """\n')
    code, _, err = check_tree(tmp_path, capsys, {"labs/lab.py": text}, {"labs/lab.py": ["listing"]})
    assert code == 1
    assert f"{tmp_path / 'scripts' / 'labs' / 'lab.py'}:4: a string pymdownx reads as the snippet marker" in err


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
        ("# --8<--[start:a]\nx = 1\n", 1, "malformed snippet marker"),
        ("x = 1  # --8<-- [start:a]\n", 1, "put the marker on a line of its own"),
    ],
    ids=["unclosed", "unopened", "duplicate", "overlap", "bad-name", "malformed", "no-space", "after-code"],
)
def test_broken_regions_name_file_line_and_region(tmp_path, capsys, text, expected_line, expected_fragment):
    code, _, err = check_tree(tmp_path, capsys, {"labs/broken_lab.py": text})
    assert code == 1
    assert f"{tmp_path / 'scripts' / 'labs' / 'broken_lab.py'}:{expected_line}:" in err
    assert expected_fragment in err


def test_marker_quoted_in_a_string_is_not_a_region(tmp_path, capsys):
    text = '"""Mark a listing like this:\n\n    # --8<-- [start:example]\n"""\nx = 1\n'
    code, stdout, err = check_tree(tmp_path, capsys, {"tool.py": text})
    assert code == 0, err
    assert "0 regions in 0 files" in stdout


def test_missing_manifest_region_is_reported(tmp_path, capsys):
    files = {"labs/lab.py": region("present", "x = 1\n")}
    manifest = {"labs/lab.py": ["present", "absent"], "labs/other_lab.py": ["thing"]}
    code, _, err = check_tree(tmp_path, capsys, files, manifest)
    assert code == 1
    assert f"{tmp_path / 'scripts' / 'labs' / 'lab.py'}: region 'absent': missing" in err
    assert "other_lab.py: file is missing; the chapter needs regions thing" in err
    assert "'present'" not in err


def test_region_not_in_the_manifest_is_listed_but_passes(tmp_path, capsys):
    files = {"labs/lab.py": region("printed", "x = 1\n") + region("helper", "y = 2\n")}
    code, stdout, err = check_tree(tmp_path, capsys, files, {"labs/lab.py": ["printed"]})
    assert code == 0, err
    assert "snippet check passed: 1 needed regions present; 2 regions in 1 files" in stdout
    assert "not in the manifest (checked, not printed): labs/lab.py: helper" in stdout


# ---------------------------------------------------------------------------------------------------------------------
# The 80-column page
# ---------------------------------------------------------------------------------------------------------------------

def test_too_wide_line_is_reported_with_its_width(tmp_path, capsys):
    wide = "x = '" + "a" * 77 + "'\n"  # 83 characters
    fits = "y = '" + "b" * 74 + "'\n"  # 80 characters
    files = {"labs/lab.py": region("listing", fits + wide)}
    code, _, err = check_tree(tmp_path, capsys, files, {"labs/lab.py": ["listing"]})
    assert code == 1
    path = tmp_path / "scripts" / "labs" / "lab.py"
    assert f"{path}:3: region 'listing': line is 83 characters, the book page fits 80" in err
    assert f"{path}:2:" not in err
    assert "1 problem(s)" in err


def test_width_is_measured_as_pymdownx_prints_it_indented(tmp_path, capsys):
    """A method region keeps its class indentation in the book (dedent_subsections is off): 84 columns."""
    method = "    def f(self):\n        return '" + "c" * 67 + "'\n"  # 84 characters in the file and printed
    text = "class Holder:\n" + region("method", method, indent="    ")
    code, _, err = check_tree(tmp_path, capsys, {"labs/lab.py": text}, {"labs/lab.py": ["method"]})
    assert code == 1
    assert f"{tmp_path / 'scripts' / 'labs' / 'lab.py'}:4: region 'method': line is 84 characters" in err
    assert max(map(len, pymdownx_include(tmp_path, "scripts/labs/lab.py", "method").splitlines())) == 84


def test_code_outside_regions_may_be_wider(tmp_path, capsys):
    text = "z = '" + "d" * 110 + "'\n" + region("listing", "x = 1\n")
    code, _, err = check_tree(tmp_path, capsys, {"labs/lab.py": text}, {"labs/lab.py": ["listing"]})
    assert code == 0, err


def test_regions_outside_the_labs_are_checked_too(tmp_path, capsys):
    wide = "x = '" + "a" * 90 + "'\n"
    files = {"labs/lab.py": region("listing", "x = 1\n"), "ch09/machinery.py": region("build_agent", wide),
             "entry.py": "x = 1\n"}
    code, _, err = check_tree(tmp_path, capsys, files, {"labs/lab.py": ["listing"]})
    assert code == 1
    assert f"{tmp_path / 'scripts' / 'ch09' / 'machinery.py'}:2: region 'build_agent': line is 96 characters" in err
    assert "entry.py" not in err


# ---------------------------------------------------------------------------------------------------------------------
# Large classes are printed in parts
# ---------------------------------------------------------------------------------------------------------------------

def test_region_printing_a_whole_large_class_is_refused(tmp_path, capsys):
    n_lines = snippets.LARGE_CLASS_LINES + 1
    text = "import os\n" + region("big_class", "@decorated\n" + class_of(n_lines - 1))
    code, _, err = check_tree(tmp_path, capsys, {"labs/lab.py": text}, {"labs/lab.py": ["big_class"]})
    assert code == 1
    assert (f"{tmp_path / 'scripts' / 'labs' / 'lab.py'}:2: region 'big_class': prints the whole class 'Big' "
            f"({n_lines} lines, more than {snippets.LARGE_CLASS_LINES}); split it into method-level regions") in err


def test_region_printing_a_whole_small_class_is_fine(tmp_path, capsys):
    text = region("small_class", class_of(snippets.LARGE_CLASS_LINES))
    code, stdout, err = check_tree(tmp_path, capsys, {"labs/lab.py": text}, {"labs/lab.py": ["small_class"]})
    assert code == 0, err
    assert "1 regions in 1 files" in stdout


def test_method_level_regions_inside_a_large_class_are_fine(tmp_path, capsys):
    body = "".join(f"    a{i} = {i}\n" for i in range(snippets.LARGE_CLASS_LINES))
    text = "class Big:\n" + body + region("one_method", "    def f(self):\n        return 1\n", indent="    ")
    code, _, err = check_tree(tmp_path, capsys, {"labs/lab.py": text}, {"labs/lab.py": ["one_method"]})
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------------------------
# Usage errors: one sentence, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "manifest_text, expected_fragment",
    [
        (None, "does not exist; pass --manifest"),
        ('{"files": {', "is not valid JSON"),
        ('{"labs": {"pixel_wrapper.py": ["a"]}}', "must hold"),
        ('{"files": {"../elsewhere.py": ["a"]}}', "use a .py path relative to scripts/"),
    ],
    ids=["missing", "bad-json", "old-layout", "outside-scripts"],
)
def test_bad_manifest_is_one_sentence_and_exit_2(tmp_path, manifest_text, expected_fragment):
    manifest = tmp_path / "manifest.json"
    if manifest_text is not None:
        manifest.write_text(manifest_text)
    result = run_snippets("--manifest", str(manifest), "check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert expected_fragment in result.stderr


def test_missing_scripts_dir_is_exit_2(tmp_path, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"files": {}}')
    code = snippets.main(["--scripts-dir", str(tmp_path / "nowhere"), "--manifest", str(manifest), "check"])
    err = capsys.readouterr().err
    assert code == 2
    assert "is not a folder; pass --scripts-dir" in err
