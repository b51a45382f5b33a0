"""Replace one `## ` section of a markdown file, leaving the rest alone.

docs/benchmarks.md is shared: other sections are written by other commands
and people, so `--output-md` owns exactly one heading's section.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, title: str, body: str) -> Path:
    """Set the body under `## title` (up to the next `## ` heading) in `path`;
    append the section, or create the file, when it is not there yet."""
    heading = f"## {title}"
    section = [heading, "", *body.rstrip("\n").splitlines(), ""]
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = section
    else:
        if not lines:
            lines = ["# Benchmarks", ""]
        elif lines[-1].strip():
            lines.append("")
        lines += section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path
