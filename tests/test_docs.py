"""The docs hold together: every relative link in README.md and docs/ names a file of the
repository, and no page points outside it (the design lives in docs/architecture/design.md)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_in_the_docs_names_a_file_of_the_repository():
    broken, checked = [], 0
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            checked += 1
            path = (page.parent / target).resolve()
            if not path.exists() or ROOT not in (path, *path.parents):
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to nothing in the repository: {broken}"
    assert checked > 40


def test_no_page_points_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}: {m}"
               for p in PAGES for m in re.findall(r"\.\./shared\S*|DESIGN\.md", p.read_text())]
    assert not outside, f"say what the design says instead (docs/architecture/design.md): {outside}"


def test_every_architecture_page_is_listed_in_the_index():
    index = (ROOT / "docs" / "architecture.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs" / "architecture").glob("*.md"))
    assert pages and all(f"(architecture/{name})" in index for name in pages), pages


def test_every_file_the_docs_name_is_in_the_repository():
    """A path in backticks (`runtime/rpc.py`) names a file that is there, so a page cannot go on
    pointing at a module after it moved (a module that moved is named by its old dotted name)."""
    rooms = sorted(d.name for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith("."))
    path = re.compile(r"`((?:%s)/[\w./-]*\.(?:py|sh|proto|md|yml|yaml|toml|json))[`:.]" % "|".join(rooms))
    named = [(page, name) for page in PAGES for name in path.findall(page.read_text())]
    missing = [f"{page.relative_to(ROOT)}: {name}" for page, name in named if not (ROOT / name).is_file()]
    assert len(named) > 40 and not missing, f"pages name files that are not there: {missing}"
