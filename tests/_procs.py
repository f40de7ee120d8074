"""The live processes of this machine from /proc (no psutil), for the tests that check that
no child outlives its test."""

from __future__ import annotations

from pathlib import Path


def live_processes() -> dict[int, tuple[int, str]]:
    """Every live (not zombie) process: pid -> (parent pid, command line)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        found[int(entry.name)] = (int(fields[1]), cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found
