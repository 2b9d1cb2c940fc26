"""Write the tables of main.py's flags (markdown), one per flag group, to ``--output``.

    python -m tools.flags_table --output docs/flags.md
"""
import argparse
from pathlib import Path
from typing import Optional

from util.flags import get_args_parser

COMMAND = "python -m tools.flags_table --output docs/flags.md"
HEADER = f"# main.py flags\n\nGenerated from main.py's parser (`util/flags.py`) by `{COMMAND}`; do not edit by hand."


def _default(action: argparse.Action) -> str:
    value = action.default
    if action.dest == "device":
        return "cuda if available, else cpu"
    if value is False:
        return "off"
    if value is None:
        return "-"
    if value == "":
        return "''"
    if isinstance(value, float) and abs(value - 1 / 3) < 1e-12:
        return "1/3"
    return str(value)


def flags_markdown() -> str:
    """One markdown table per group of main.py's parser: flag, default and meaning."""
    parser = get_args_parser()
    blocks = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.dest != "help"]
        if not actions:
            continue
        title = "general" if group.title == "options" else group.title
        lines = [f"**{title}**", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for action in actions:
            meaning = (action.help or "").replace("|", "\\|")
            if action.choices and "one of" not in meaning:
                meaning += f" (one of: {', '.join(map(str, action.choices))})"
            lines.append(f"| `{action.option_strings[0]}` | {_default(action)} | {meaning} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def document() -> str:
    """The whole file: the header, then the tables."""
    return f"{HEADER}\n\n{flags_markdown()}\n"


def run(argv: Optional[list[str]] = None) -> None:
    """Write ``document()`` to ``--output``."""
    p = argparse.ArgumentParser("python -m tools.flags_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="docs/flags.md", help="the markdown file to write (default: docs/flags.md)")
    output = Path(p.parse_args(argv).output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(document(), encoding="utf-8")
    print(f"written to {output}")


if __name__ == "__main__":
    run()
