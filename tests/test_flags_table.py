"""tools/flags_table.py: docs/flags.md holds the flags tables of main.py's parser as they are now."""
from pathlib import Path

from tools import flags_table
from util.flags import get_args_parser

DOCS_FLAGS = Path(__file__).resolve().parent.parent / "docs" / "flags.md"


def test_docs_flags_md_is_what_the_tool_writes_now():
    assert DOCS_FLAGS.read_text(encoding="utf-8") == flags_table.document(), (
        f"docs/flags.md is stale: regenerate it with {flags_table.COMMAND}")


def test_every_flag_of_the_parser_has_a_row():
    tables = flags_table.flags_markdown()
    missing = [a.option_strings[0] for a in get_args_parser()._actions
               if a.dest != "help" and f"| `{a.option_strings[0]}` |" not in tables]
    assert missing == []


def test_the_tool_writes_the_document_to_output(tmp_path):
    output = tmp_path / "docs" / "flags.md"
    flags_table.run(["--output", str(output)])
    assert output.read_text(encoding="utf-8") == flags_table.document()
