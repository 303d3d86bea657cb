"""Interrupting a batch job mid-way, as a crash or an OOM kill would."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigkill_after_lines(command: list[str], env: dict[str, str], journal: Path, lines: int, timeout_s: float) -> None:
    """Start `command`, SIGKILL it as soon as `journal` holds `lines` newlines (or after timeout_s)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and (not journal.exists() or journal.read_bytes().count(b"\n") < lines):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
