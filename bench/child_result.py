"""Benchmarks that measure in a fresh child process: the child prints one `RESULT <json>` line, the parent
runs it and reads that line back.

    emit({"wall_s": 1.2})                                       # in the child
    r = run([sys.executable, __file__, "--child", ...], what="chunk 1000")   # in the parent -> {"wall_s": 1.2}
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

PREFIX = "RESULT "


def emit(result: dict[str, Any]) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def run(cmd: list[str], *, what: str, **kwargs: Any) -> dict[str, Any]:
    """Run `cmd` (subprocess.run keyword arguments allowed) and return its last RESULT line; a child that exits
    non-zero or prints none raises with the tail of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(PREFIX):])
