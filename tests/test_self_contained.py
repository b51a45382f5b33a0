"""The repository works on its own: no tracked file points outside it.

A clone is often copied somewhere with nothing beside it (CI, a Docker build
context, a user's machine), so a path that climbs above the repository root
works only by accident of where the checkout happens to live.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".yml", ".yaml", ".json", ".cfg", ".txt", ".env"}
TEXT_NAMES = {"Makefile", "Dockerfile", "run", ".dockerignore", ".gitignore"}
# `../x/y` as written in code, shell or prose (not `...` and not inside a URL).
RELATIVE_UP = re.compile(r"(?<![\w.:/])((?:\.\./)+[\w-][\w./-]*)")
# pathlib reaching the folder that sits beside checkouts here: `ROOT.parent / "shared"`.
SIBLING_FOLDER = re.compile(r"[\"']shared[\"']\s*/|/\s*[\"']shared[\"']")
# The path-traversal payload that the security tests send and the docs show: an
# input the server must refuse, not a file anything reads.
TRAVERSAL_PAYLOAD = "etc/passwd"


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    paths = [REPO / name for name in listed]
    # This file is skipped: its own examples of bad paths are the point of it.
    return [p for p in paths if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES)
            and "data" not in p.relative_to(REPO).parts[:2] and p != Path(__file__).resolve()]


def outside_references(path: Path, root: Path = REPO) -> list[str]:
    """What `path` names outside `root`: relative paths that reach an existing
    file or folder outside it (read from the file's folder, as a doc link is,
    or from the root, where commands run), and pathlib steps into a sibling of
    the checkout. Names that exist nowhere are test inputs, not dependencies."""

    def reaches_outside(relative: str) -> bool:
        targets = [(base / relative).resolve() for base in (path.parent, root)]
        return any(t.exists() and not t.is_relative_to(root) for t in targets)

    text = path.read_text(encoding="utf-8", errors="replace")
    found = [m.group(1) for m in RELATIVE_UP.finditer(text)
             if reaches_outside(m.group(1)) and TRAVERSAL_PAYLOAD not in m.group(1)]
    found += [m.group(0) for m in SIBLING_FOLDER.finditer(text)]
    return found


def test_no_tracked_file_refers_to_a_path_outside_the_repository() -> None:
    offenders = {str(p.relative_to(REPO)): refs for p in tracked_text_files()
                 if (refs := outside_references(p))}
    assert offenders == {}


def test_the_check_sees_each_kind_of_outside_path(tmp_path: Path) -> None:
    root, beside = tmp_path / "repo", tmp_path / "shared" / "data"
    (root / "docs").mkdir(parents=True)
    beside.mkdir(parents=True)
    (beside / "README.md").write_text("data\n")
    (root / "README.md").write_text("readme\n")
    doc = root / "docs" / "doc.md"
    doc.write_text("Data: ../shared/data/README.md; see ../README.md, http://a/../b, ../nowhere\n")
    code = root / "code.py"
    code.write_text('DATA = REPO_ROOT.parent / "shared" / "data"\nOK = ROOT / "data"\n')
    payload = root / "payload.py"
    payload.write_text('BAD_NAME = "../../../../etc/passwd"\n')
    assert outside_references(doc, root) == ["../shared/data/README.md"]
    assert outside_references(code, root) == ['/ "shared"']
    assert outside_references(payload, root) == []
