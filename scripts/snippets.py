#!/usr/bin/env python3
"""Check and extract the code regions the book prints from the lab files.

The chapter never pastes code by line number. Each listing is a named region of a lab file, marked with the
pymdown-extensions snippet syntax, exactly:

    # --8<-- [start:spatial_softmax]
    class SpatialSoftmax(nn.Module):
        ...
    # --8<-- [end:spatial_softmax]

Region names match ``[a-z][a-z0-9_]*`` and are unique within a file; regions may nest but must not overlap.
The regions the chapter needs are listed in ``scripts/snippets_manifest.json``.

Usage:
    python scripts/snippets.py check                 # every lab file well-formed, every manifest region present
    python scripts/snippets.py check --existing-only # skip lab files that do not exist yet
    python scripts/snippets.py extract OUTDIR        # OUTDIR/<lab>/<region>.py, markers stripped, dedented

Exit status is 0 when everything is in order and 1 otherwise; each problem is printed as
``path:line: region 'name': what is wrong``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
LABS_DIR = SCRIPTS_DIR / "labs"
MANIFEST_PATH = SCRIPTS_DIR / "snippets_manifest.json"

# A marker line: optional indentation, then `# --8<-- [start:name]` or `# --8<-- [end:name]`.
MARKER_RE = re.compile(r"^\s*#\s*--8<--\s*\[(?P<kind>start|end):(?P<name>[^\]]*)\]\s*$")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Anything that looks like an attempt at a marker, so a typo is reported instead of silently ignored.
NEAR_MARKER_RE = re.compile(r"--8<--")


@dataclass(frozen=True)
class Region:
    name: str
    start_line: int  # 1-based line of the start marker
    end_line: int  # 1-based line of the end marker
    body: str  # the lines strictly between the markers, nested markers removed, dedented


class SnippetError(Exception):
    """One problem in one file, formatted as `path:line: message`."""


def parse_regions(path: Path) -> tuple[dict[str, Region], list[str]]:
    """Parse all regions of one file. Returns (regions by name, list of problems)."""
    problems: list[str] = []
    regions: dict[str, Region] = {}
    open_stack: list[tuple[str, int]] = []  # (name, start line)
    lines = path.read_text(encoding="utf-8").splitlines()

    for lineno, line in enumerate(lines, start=1):
        match = MARKER_RE.match(line)
        if match is None:
            if NEAR_MARKER_RE.search(line) and line.lstrip().startswith("#"):
                problems.append(f"{path}:{lineno}: malformed snippet marker {line.strip()!r}; "
                                "write '# --8<-- [start:name]' or '# --8<-- [end:name]'")
            continue
        kind, name = match["kind"], match["name"]
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
        body_lines = [raw for raw in lines[start:lineno - 1] if not MARKER_RE.match(raw)]
        regions[name] = Region(name, start, lineno, textwrap.dedent("\n".join(body_lines)).strip("\n") + "\n")

    for name, start in open_stack:
        problems.append(f"{path}:{start}: region {name!r}: start marker is never closed")
    for region in regions.values():
        if not region.body.strip():
            problems.append(f"{path}:{region.start_line}: region {region.name!r}: is empty")
    return regions, problems


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, list[str]]:
    """The regions the chapter needs, by lab file name."""
    return json.loads(path.read_text(encoding="utf-8"))["labs"]


def check(labs_dir: Path, manifest: dict[str, list[str]], existing_only: bool = False) -> list[str]:
    """Every problem found in the lab files: malformed regions and manifest regions that are missing."""
    problems: list[str] = []
    lab_files = sorted(set(labs_dir.glob("*.py")) | {labs_dir / name for name in manifest})
    for lab in lab_files:
        if not lab.exists():
            if not existing_only:
                problems.append(f"{lab}: lab file is missing; the chapter needs regions "
                                f"{', '.join(manifest[lab.name])} from it")
            continue
        regions, file_problems = parse_regions(lab)
        problems.extend(file_problems)
        for name in manifest.get(lab.name, []):
            if name not in regions:
                problems.append(f"{lab}: region {name!r}: missing; the chapter prints it "
                                f"(add '# --8<-- [start:{name}]' ... '# --8<-- [end:{name}]')")
    return problems


def extract(labs_dir: Path, out_dir: Path) -> int:
    """Write every region of every lab file to OUTDIR/<lab>/<region>.py. Returns the number written."""
    written = 0
    for lab in sorted(labs_dir.glob("*.py")):
        regions, _ = parse_regions(lab)
        for region in regions.values():
            target = out_dir / lab.stem / f"{region.name}.py"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(region.body, encoding="utf-8")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labs-dir", type=Path, default=LABS_DIR, help="folder of lab files (default: scripts/labs)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help="JSON list of needed regions")
    sub = parser.add_subparsers(dest="command", required=True)
    check_cmd = sub.add_parser("check", help="verify markers and that every needed region is present")
    check_cmd.add_argument("--existing-only", action="store_true",
                           help="only check lab files that exist (while the labs are being written)")
    extract_cmd = sub.add_parser("extract", help="write each region to OUTDIR/<lab>/<region>.py")
    extract_cmd.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    manifest = load_manifest(args.manifest)
    problems = check(args.labs_dir, manifest, existing_only=getattr(args, "existing_only", False))
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.command == "check":
        if problems:
            print(f"snippet check failed: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        n_needed = sum(len(names) for names in manifest.values())
        print(f"snippet check passed: {n_needed} needed regions present in {len(manifest)} lab files")
        return 0
    if problems:
        print("refusing to extract from broken lab files; fix the problems above first", file=sys.stderr)
        return 1
    written = extract(args.labs_dir, args.out_dir)
    print(f"wrote {written} regions under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
