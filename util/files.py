"""Writing files so that a run cut short never leaves a partial one under the final name."""
import json
import os
from typing import Any, Optional


def write_json(data: Any, path: str | os.PathLike, indent: Optional[int] = None) -> None:
    """``data`` as JSON at ``path`` (indented: with a final newline), written beside it and renamed:
    an interrupted or failed write leaves whatever ``path`` held before, and no partial file."""
    path = os.fspath(path)
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as f:
            json.dump(data, f, indent=indent)
            if indent is not None:
                f.write("\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
