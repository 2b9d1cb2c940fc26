"""Command-line tools, run from the repository root: ``python -m tools.NAME`` and ``bash tools/NAME.sh``."""
