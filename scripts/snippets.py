#!/usr/bin/env python3
"""Check and extract the code regions the book prints from the files under ``scripts/``.

The chapter never pastes code by line number. Each listing is a named region of a Python file, marked with the
pymdown-extensions snippet syntax, exactly:

    # --8<-- [start:spatial_softmax]
    class SpatialSoftmax(nn.Module):
        ...
    # --8<-- [end:spatial_softmax]

A marker is a comment on a line of its own. The book is built with pymdown-extensions' snippets (the Markdown
configuration is in the README, "Snippets for the book"): a region prints exactly what pymdownx includes for
``--8<-- "scripts/labs/<file>.py:<region>"``, the lines between the markers as they stand in the file (nested
markers dropped, nothing dedented), and every rule below is measured on that text. A comment that pymdownx does
not read as a marker (``# --8<--[start:x]``: no space after the scissors) is refused, since the book would print
it; one it does read (``# -8<- [start:x]``) is a marker here too; a string line it would read as one is refused.
Region names match ``[a-z][a-z0-9_]*`` and are unique within a file; regions may nest but must not overlap.
``scripts/snippets_manifest.json`` lists, by path under ``scripts/``, the regions the chapter prints.

``check`` looks at every ``.py`` file under ``scripts/`` that has markers, not only the labs, and reports:

| rule                                  | why                                                         |
|---------------------------------------|-------------------------------------------------------------|
| markers balanced, nested, names valid | a broken marker silently drops or garbles a listing         |
| every manifest region present         | the chapter prints it                                       |
| printed lines at most 80 characters   | the book page fits 80 (measured as pymdownx prints them)    |
| no region prints a whole large class  | a class over ``LARGE_CLASS_LINES`` lines is shown in parts  |

Regions not in the manifest are checked the same way and listed in the summary; they are not an error.

Usage:
    python scripts/snippets.py check           # every region well-formed and printable, every manifest region present
    python scripts/snippets.py extract OUTDIR  # OUTDIR/<file stem>/<region>.py: what pymdownx includes

Exit status: 0 when everything is in order, 1 when the code has problems (each printed as
``path:line: region 'name': what is wrong``), 2 for a usage error (missing manifest, bad JSON), in one sentence.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

try:
    from cli_guard import guard_entry_point, parse_with_one_line_errors, run_guarded
except ModuleNotFoundError:  # the project is not installed in this Python: one sentence, not a traceback
    print("error: this project is not installed in this Python; run `pip install -e .` in the repository, or run "
          "the command through `bash docker/dev.sh python ...`.", file=sys.stderr)
    sys.exit(2)  # a mistake the user can fix, as cli_guard would say it (it is what could not be imported)

guard_entry_point(__name__)  # a bug is one line and a crash log, never a traceback

SCRIPTS_DIR = Path(__file__).resolve().parent
LABS_DIR = SCRIPTS_DIR / "labs"
MANIFEST_PATH = SCRIPTS_DIR / "snippets_manifest.json"

# The book's code listings are set in a monospaced font on a page that fits this many characters per line.
BOOK_LINE_WIDTH = 80
# A class printed whole should read as one listing with at most one page turn (about a page and a half); a longer
# class is printed method by method, with prose between the parts. Page height depends on the layout: this is the
# budget we chose for a listing, not a measurement. Counted from the first decorator to the last line of the class.
LARGE_CLASS_LINES = 80

# A section marker as pymdown-extensions reads it, in any line (pymdownx.snippets.SnippetPreprocessor's
# RE_SNIPPET_SECTION, pymdown-extensions 13.1.2): dashes, `8<`, dashes, at least one space or tab, then
# `[start:name]` or `[end:name]`; `;` before the scissors escapes it (printed, less one `;`).
# tests/test_snippets.py checks that every region of the tree renders through pymdownx itself as extracted here.
MARKER_RE = re.compile(r"""(?xi)
    ^(?P<pre>.*?) (?<!;)(?!(?<=-)-) (?P<escape>;*)
    -+8<-+[ \t]+
    \[[ \t]*(?P<kind>start|end)[ \t]*:[ \t]*(?P<name>[a-z][-_0-9a-z]*)[ \t]*\]
    (?P<post>.*?)$""")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# The scissors as pymdownx looks for them: a comment carrying them that is not a marker is reported, never ignored.
SCISSORS = "8<-"


class UsageError(Exception):
    """Something the user gave is unusable (a missing file, bad JSON); the message is one sentence."""


@dataclass(frozen=True)
class Region:
    name: str
    start_line: int  # 1-based line of the start marker
    end_line: int  # 1-based line of the end marker
    body: str  # the lines strictly between the markers as they stand, nested markers removed: pymdownx's text
    # (1-based source line, line as printed) for every line of `body`, so a problem can point at the source.
    printed_lines: tuple[tuple[int, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ScannedFile:
    """One file's regions and the problems found in it."""

    path: Path
    regions: dict[str, Region]
    problems: list[str]


def _marker_comments(path: Path, text: str) -> tuple[dict[int, str], list[str]]:
    """Whole-line comments that carry the scissors, by line, found with the tokenizer; and the problems of the
    other lines that carry them (a marker after code, a string that pymdownx would read as a marker)."""
    comments: dict[int, str] = {}
    problems: list[str] = []
    reported: set[int] = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type != tokenize.COMMENT or SCISSORS not in token.string:
                continue
            lineno, col = token.start
            if token.line[:col].strip():
                problems.append(f"{path}:{lineno}: snippet marker after code {token.string!r}; "
                                "put the marker on a line of its own")
                reported.add(lineno)
                continue
            comments[lineno] = token.string
    except (tokenize.TokenError, SyntaxError) as error:
        return comments, [f"{path}: cannot be read as Python ({error}); fix the file so its regions can be checked"]
    if comments:  # a file with regions: pymdownx reads every line, strings included
        for lineno, line in enumerate(text.splitlines(), start=1):
            match = MARKER_RE.match(line) if SCISSORS in line else None
            if match and not match["escape"] and lineno not in comments and lineno not in reported:
                problems.append(f"{path}:{lineno}: a string pymdownx reads as the snippet marker "
                                f"'[{match['kind']}:{match['name']}]'; write the scissors as '--8<' + '--' there")
    return comments, problems


def parse_regions(path: Path) -> tuple[dict[str, Region], list[str]]:
    """Parse all regions of one file. Returns (regions by name, list of problems)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # as pymdownx reads the file
    comments, problems = _marker_comments(path, text)
    regions: dict[str, Region] = {}
    open_stack: list[tuple[str, int]] = []  # (name, start line)

    for lineno in sorted(comments):
        comment = comments[lineno]
        match = MARKER_RE.match(comment)
        if match is None or match["escape"]:
            problems.append(f"{path}:{lineno}: malformed snippet marker {comment!r}, which pymdownx would print "
                            "as code; write '# --8<-- [start:name]' or '# --8<-- [end:name]'")
            continue
        kind, name = match["kind"].lower(), match["name"]
        if not NAME_RE.match(name):
            problems.append(f"{path}:{lineno}: region {name!r}: invalid name; use [a-z][a-z0-9_]*")
            continue
        if kind == "start":
            if name in regions or any(open_name == name for open_name, _ in open_stack):
                first = regions[name].start_line if name in regions else dict(open_stack)[name]
                problems.append(f"{path}:{lineno}: region {name!r}: duplicate name (first started at line {first})")
                continue
            open_stack.append((name, lineno))
            continue
        # kind == "end"
        if not open_stack:
            problems.append(f"{path}:{lineno}: region {name!r}: end marker without a matching start")
            continue
        open_name, start = open_stack[-1]
        if open_name != name:
            if any(n == name for n, _ in open_stack):
                problems.append(f"{path}:{lineno}: region {name!r}: ends before region {open_name!r} "
                                f"(started at line {start}) that it contains; regions must nest, not overlap")
            else:
                problems.append(f"{path}:{lineno}: region {name!r}: end marker without a matching start")
            continue
        open_stack.pop()
        # As pymdownx prints them: the lines as they stand (dedent_subsections off), nested markers dropped.
        printed = tuple((n, lines[n - 1]) for n in range(start + 1, lineno) if n not in comments)
        body = "".join(line + "\n" for _, line in printed)
        regions[name] = Region(name, start, lineno, body, printed)

    for name, start in open_stack:
        problems.append(f"{path}:{start}: region {name!r}: start marker is never closed")
    for region in regions.values():
        if not region.body.strip():
            problems.append(f"{path}:{region.start_line}: region {region.name!r}: is empty")
    return regions, problems


def width_problems(path: Path, region: Region, width: int = BOOK_LINE_WIDTH) -> list[str]:
    """Each line of the region that is wider, as printed, than the book page."""
    return [f"{path}:{lineno}: region {region.name!r}: line is {len(line)} characters, the book page fits {width}"
            for lineno, line in region.printed_lines if len(line) > width]


def large_class_problems(path: Path, text: str, regions: dict[str, Region],
                         max_lines: int = LARGE_CLASS_LINES) -> list[str]:
    """Regions that print a whole class longer than `max_lines`: such a class is shown method by method."""
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as error:
        return [f"{path}:{error.lineno}: cannot be parsed ({error.msg}); fix the file so its regions can be checked"]
    classes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            if node.end_lineno - first + 1 > max_lines:
                classes.append((first, node.end_lineno, node.name))
    problems = []
    for region in sorted(regions.values(), key=lambda r: r.start_line):
        for first, last, class_name in sorted(classes):
            if region.start_line < first and last < region.end_line:
                problems.append(f"{path}:{region.start_line}: region {region.name!r}: prints the whole class "
                                f"{class_name!r} ({last - first + 1} lines, more than {max_lines}); split it into "
                                "method-level regions so the chapter can explain it in parts")
    return problems


def scan_file(path: Path) -> ScannedFile:
    """Parse one file and apply every rule to its regions."""
    regions, problems = parse_regions(path)
    for region in sorted(regions.values(), key=lambda r: r.start_line):
        problems.extend(width_problems(path, region))
    if regions:
        problems.extend(large_class_problems(path, path.read_text(encoding="utf-8"), regions))
    return ScannedFile(path, regions, problems)


def find_region_files(scripts_dir: Path) -> list[Path]:
    """Every `.py` file under `scripts_dir` that mentions the snippet scissors (hidden folders skipped)."""
    found = []
    for path in sorted(scripts_dir.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(scripts_dir).parts):
            continue
        if SCISSORS in path.read_text(encoding="utf-8", errors="replace"):
            found.append(path)
    return found


def scan(scripts_dir: Path, manifest: dict[str, list[str]]) -> dict[str, ScannedFile]:
    """Every file with markers, plus every existing manifest file, by path relative to `scripts_dir`."""
    if not scripts_dir.is_dir():
        raise UsageError(f"{scripts_dir} is not a folder; pass --scripts-dir with the folder that holds the code")
    paths = set(find_region_files(scripts_dir))
    paths |= {scripts_dir / rel for rel in manifest if (scripts_dir / rel).is_file()}
    return {path.relative_to(scripts_dir).as_posix(): scan_file(path) for path in sorted(paths)}


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, list[str]]:
    """The regions the chapter prints, by file path relative to ``scripts/`` (``labs/pixel_wrapper.py``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"manifest {path} does not exist; pass --manifest with the JSON list of regions") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"manifest {path} cannot be read ({error}); pass a readable JSON file") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"manifest {path} is not valid JSON (line {error.lineno}: {error.msg}); fix it") from None
    files = data.get("files") if isinstance(data, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(rel, str) and isinstance(names, list) and all(isinstance(n, str) for n in names)
        for rel, names in files.items())
    if not valid:
        raise UsageError(f'manifest {path} must hold {{"files": {{"<path under scripts/>": ["region", ...]}}}}; '
                         "fix its layout")
    for rel in files:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or pure.suffix != ".py":
            raise UsageError(f"manifest {path} lists {rel!r}; use a .py path relative to scripts/, "
                             "such as 'labs/pixel_wrapper.py'")
    return files


def check(scanned: dict[str, ScannedFile], scripts_dir: Path, manifest: dict[str, list[str]]) -> list[str]:
    """Every problem: those found in each file, then manifest regions that are missing."""
    problems: list[str] = []
    for scanned_file in scanned.values():
        problems.extend(scanned_file.problems)
    for rel, names in manifest.items():
        if rel not in scanned:
            problems.append(f"{scripts_dir / rel}: file is missing; the chapter needs regions "
                            f"{', '.join(names)} from it")
            continue
        for name in names:
            if name not in scanned[rel].regions:
                problems.append(f"{scanned[rel].path}: region {name!r}: missing; the chapter prints it "
                                f"(add '# --8<-- [start:{name}]' ... '# --8<-- [end:{name}]')")
    return problems


def unlisted_regions(scanned: dict[str, ScannedFile], manifest: dict[str, list[str]]) -> dict[str, list[str]]:
    """Regions that exist in the code but that the manifest does not list, by file."""
    unlisted = {rel: [name for name in f.regions if name not in manifest.get(rel, [])] for rel, f in scanned.items()}
    return {rel: names for rel, names in unlisted.items() if names}


def extract(scanned: dict[str, ScannedFile], out_dir: Path) -> int:
    """Write every region of every scanned file to OUTDIR/<file stem>/<region>.py. Returns the number written."""
    stems: dict[str, str] = {}
    for rel, scanned_file in scanned.items():
        stem = scanned_file.path.stem
        if scanned_file.regions and stems.setdefault(stem, rel) != rel:
            raise UsageError(f"{stems[stem]} and {rel} would both extract to {out_dir / stem}; rename one of them")
    written = 0
    for scanned_file in scanned.values():
        for region in scanned_file.regions.values():
            target = out_dir / scanned_file.path.stem / f"{region.name}.py"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(region.body, encoding="utf-8")
            except OSError as error:
                raise UsageError(f"cannot write {target} ({error.strerror}); pass a writable OUTDIR") from None
            written += 1
    return written


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    scanned = scan(args.scripts_dir, manifest)
    problems = check(scanned, args.scripts_dir, manifest)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.command == "check":
        if problems:
            print(f"snippet check failed: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        n_needed = sum(len(names) for names in manifest.values())
        n_regions = sum(len(f.regions) for f in scanned.values())
        n_files = sum(1 for f in scanned.values() if f.regions)
        print(f"snippet check passed: {n_needed} needed regions present; {n_regions} regions in "
              f"{n_files} files fit {BOOK_LINE_WIDTH} columns and print no class over {LARGE_CLASS_LINES} lines")
        for rel, names in unlisted_regions(scanned, manifest).items():
            print(f"  not in the manifest (checked, not printed): {rel}: {', '.join(names)}")
        return 0
    if problems:
        print("refusing to extract from files with problems; fix the problems above first", file=sys.stderr)
        return 1
    written = extract(scanned, args.out_dir)
    print(f"wrote {written} regions under {args.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts-dir", type=Path, default=SCRIPTS_DIR,
                        help="folder searched (recursively) for files with regions (default: scripts/)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH,
                        help="JSON list of the regions the chapter prints (default: scripts/snippets_manifest.json)")
    # not required=True: argparse would then report a missing command before an unknown flag
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("check", help="verify markers, widths, class sizes and that every needed region is present")
    extract_cmd = sub.add_parser("extract", help="write each region to OUTDIR/<file stem>/<region>.py")
    extract_cmd.add_argument("out_dir", type=Path, metavar="OUTDIR")

    def parse() -> argparse.Namespace:
        parsed = parser.parse_args(argv)
        if parsed.command is None:
            parser.error("name a command: check or extract")
        return parsed

    args = parse_with_one_line_errors(parse)
    try:
        return run(args)
    except UsageError as error:
        print(f"snippets: {error}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as error:
        print(f"snippets: a file under {args.scripts_dir} is not UTF-8 ({error.reason}); save it as UTF-8",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_guarded(main))
