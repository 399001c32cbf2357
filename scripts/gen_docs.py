"""Regenerate the environment tables of docs/configuration.md from proto/defaults.py.

    python scripts/gen_docs.py           # rewrite the tables in place
    python scripts/gen_docs.py --check   # exit 1 (naming the fix) if the committed tables are stale

The tables sit between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``
lines; everything else on the page is written by hand. tests/proto/test_defaults.py runs the
check, so a default or help text changed in one place shows up in the docs or fails the suite.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def _defaults():
    import importlib.util  # proto/defaults.py imports nothing from the package: load it as a file, no install needed

    spec = importlib.util.spec_from_file_location("_shardps_defaults", ROOT / "proto" / "defaults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(settings) -> str:
    """One row per variable; settings that share a variable (SHARDPS_PORT of coordinator and
    server) are one row naming each reader's default (and help, where it differs)."""
    rows: dict[str, list] = {}
    for s in settings:
        rows.setdefault(s.env, []).append(s)
    lines = ["| variable | read by | meaning | default |", "|---|---|---|---|"]
    for env, group in rows.items():
        readers = ", ".join(dict.fromkeys(s.read_by for s in group))
        helps = list(dict.fromkeys(s.help for s in group))
        meaning = helps[0] if len(helps) == 1 else " ".join(f"{s.read_by}: {s.help}" for s in group)
        shown = list(dict.fromkeys(s.shown_default() for s in group))
        default = shown[0] if len(shown) == 1 else " / ".join(f"{s.shown_default()} ({s.read_by})" for s in group)
        lines.append(f"| `{env}` | {_cell(readers)} | {_cell(meaning)} | {_cell(default)} |")
    return "\n".join(lines) + "\n"


def generated_tables() -> dict[str, str]:
    d = _defaults()
    return {"environment": render(d.SETTINGS), "deployment": render(d.DEPLOY_SETTINGS)}


def rewrite(page: str, tables: dict[str, str]) -> str:
    """``page`` with each generated block replaced; ValueError if a block's markers are missing."""
    for name, table in tables.items():
        begin, end = f"<!-- BEGIN generated: {name} -->\n", f"<!-- END generated: {name} -->"
        try:
            head, rest = page.split(begin, 1)
            _, tail = rest.split(end, 1)
        except ValueError:
            raise ValueError(f"{PAGE} lacks the lines {begin.strip()} ... {end}; put them back around the table") \
                from None
        page = head + begin + table + end + tail
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed tables are current")
    args = parser.parse_args(argv)
    old = PAGE.read_text()
    new = rewrite(old, generated_tables())
    if args.check:
        if new != old:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python scripts/gen_docs.py and commit it", file=sys.stderr)
            return 1
        return 0
    if new != old:
        PAGE.write_text(new)
        print(f"rewrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
