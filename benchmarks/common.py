"""Shared pieces of the benchmark scripts: machine description and result tables."""
from __future__ import annotations

import os
import platform
import subprocess
import time


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch
    import vllm

    return (f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM; torch {torch.__version__}, "
            f"vllm {vllm.__version__}, float32")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, table: str, notes: str = "") -> str:
    path = os.path.join(os.path.dirname(__file__), "results", f"{name}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = (f"# {title}\n\nMachine: {machine()}\nDate: {time.strftime('%Y-%m-%d %H:%M')}, commit {commit}\n\n"
            f"{table}\n\n{notes}\n")
    with open(path, "w") as f:
        f.write(text)
    return path
