"""Print the README's "All flags" tables from main.py's parser (paste them into README.md).

    python tools/flags_table.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402


def _default(action) -> str:
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
    parser = main.get_args_parser()
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


if __name__ == "__main__":
    print(flags_markdown())
