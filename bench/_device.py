"""What every bench prints first: the machine it measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """``<model name> (<n> logical cores), <OS> <release>`` from /proc/cpuinfo (Linux), else what platform knows."""
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'unknown CPU'} ({os.cpu_count()} logical cores), {platform.system()} {platform.release()}"
