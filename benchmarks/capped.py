"""Run a command under a memory cap (a child of this process's memory cgroup), and say whether it fitted.

Peak RSS counts the clean file pages a process has mapped (OpenVINO maps an IR's weights and reads them all while
compiling) as much as the memory it allocated; the kernel takes the former back whenever memory runs short. A cap
answers the question a small device asks: does the run finish, and at what speed, within N MB (its own
allocations plus the page cache it reads, as the cgroup counts them)?

    python benchmarks/capped.py 1538 --evict /tmp/cmp512/bundle-ov-int8-full+bf16 -- \\
        python benchmarks/compare.py --side ov-int8-full+bf16 --workdir /tmp/cmp512

--evict drops the named files (or a folder's files) from the page cache first, so that their pages are read, and
counted, inside the cap. Needs a writable memory cgroup (v1 or v2), e.g. root in a container. Prints one JSON
line: exit status, whether the kernel killed it for memory, the cgroup's peak, how often the cap was hit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def own_memory_cgroup() -> tuple[Path, int]:
    """(folder, cgroup version) of this process's memory cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        ident, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return ROOT / "memory" / path.lstrip("/"), 1
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return ROOT / line[3:].lstrip("/"), 2
    raise SystemExit("error: no memory cgroup for this process")


def evict(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s CAP_MB [--evict PATH ...] -- COMMAND ...")
    ap.add_argument("cap_mb", type=int)
    ap.add_argument("--evict", type=Path, action="append", default=[])
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        ap.error("the command to run goes after --")
    a = ap.parse_args(argv[:argv.index("--")])
    cmd = argv[argv.index("--") + 1:]
    parent, version = own_memory_cgroup()
    child = parent / f"nsdedge-cap-{os.getpid()}"
    child.mkdir()
    try:
        limit, peak, events = (("memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.failcnt") if version == 1
                               else ("memory.max", "memory.peak", "memory.events"))
        (child / limit).write_text(str(a.cap_mb << 20))
        evicted = evict(a.evict)
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: (child / "cgroup.procs").write_text(str(os.getpid())))
        out, _ = p.communicate()
        seconds = time.perf_counter() - t
        ev = (child / events).read_text().split()
        result = {"cap_mb": a.cap_mb, "cgroup": version, "returncode": p.returncode,
                  "killed": p.returncode == -9, "seconds": round(seconds, 1), "evicted_files": evicted,
                  "cgroup_peak_mb": int((child / peak).read_text()) >> 20 if (child / peak).exists() else None,
                  "cap_hits" if version == 1 else "events": int(ev[0]) if version == 1 else dict(zip(ev[::2], ev[1::2])),
                  "stdout_tail": out.strip().splitlines()[-1:] if out.strip() else []}
        print(json.dumps(result))
    finally:
        time.sleep(0.2)
        child.rmdir()


if __name__ == "__main__":
    sys.exit(main())
