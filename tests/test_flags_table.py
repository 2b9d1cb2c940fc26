"""tools/flags_table.py: the README's "All flags" tables are the parser's."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import flags_table  # noqa: E402


def test_readme_holds_the_flags_tables_of_todays_parser():
    tables = flags_table.flags_markdown().strip()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "| `--eval_ratios`" in tables
    assert tables in readme, "README.md's flags tables are stale: paste the output of python tools/flags_table.py"
