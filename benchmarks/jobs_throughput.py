"""Images per second of a job: the local backend, and Ray with 1 and 2 actors, on this machine.

    python benchmarks/jobs_throughput.py --workdir /tmp/nsdedge-jobs [--preset tiny] [--trials 32] [--steps 20]

Each side is one `nsdedge run --job` process (as a user starts it) on the same bundle and voxels, writing into an
empty directory; the images of every side are compared with the first side's (equal inference threads: equal bytes;
another thread count: within 1/255, see nsdedge/jobs.py). Reported: images/s over the job
(from the command's own summary: after Ray is up and the bundle checked), and the process's wall time (Ray's
start and the actors' session loads included). Results: benchmarks/results/jobs-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsdedge.bench import cpu_flags, cpu_name  # noqa: E402


def _pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _batch_sizes(bundle: Path, work: Path, a) -> dict:
    """Ray started once in this process; one 1-CPU actor per job: images/s from the job's start (actor start, session
    loads included) at each batch size."""
    import ray

    from nsdedge.jobs import Job, Work, run_job

    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level="ERROR")
    out = {}
    try:
        for bs in (int(b) for b in a.batch_sizes.split(",")):
            dest = work / f"out-bs{bs}"
            shutil.rmtree(dest, ignore_errors=True)
            r = run_job(Job(bundle, [Work(work / "voxels.npy", "synth01", dest)], steps=a.steps), "ray", actors=1,
                        batch_size=bs)
            out[f"batch_{bs}"] = {"images_per_second": round(r.images_per_second, 3), "seconds": round(r.seconds, 2)}
            print(f"in-process Ray, 1 actor, batch {bs:<3} {r.images_per_second:6.2f} images/s", flush=True)
    finally:
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/nsdedge-jobs")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sides", default="local-t1,local,ray-1,ray-2",
                    help="local (all cores), local-tN (N inference threads), ray-K (K actors of 1 CPU, 1 thread)")
    ap.add_argument("--batch-sizes", default="1,4,16",
                    help="then, in this process with Ray already up: 1 actor at each batch size (Ray's per-batch cost)")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / f"bundle-{a.preset}"
    if not (bundle / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "nsdedge.cli", "export", "--preset", a.preset, "--out", str(bundle)],
                       check=True)
    m = json.loads((bundle / "manifest.json").read_text())
    voxels = int(m["components"]["decoder-synth01"]["voxels"])
    np.save(work / "voxels.npy", np.random.default_rng(0).standard_normal((a.trials, voxels)))
    results, reference = {}, None
    for side in a.sides.split(","):
        out = work / f"out-{side}"
        shutil.rmtree(out, ignore_errors=True)
        (work / f"job-{side}.json").write_text(json.dumps({
            "bundle": str(bundle), "settings": {"steps": a.steps},
            "work": [{"voxels": "voxels.npy", "subject": "synth01", "out": out.name}]}))
        cmd = [sys.executable, "-m", "nsdedge.cli", "run", "--job", str(work / f"job-{side}.json")]
        if side.startswith("ray-"):
            cmd += ["--backend", "ray", "--actors", side.split("-")[1]]
        elif side.startswith("local-t"):
            cmd += ["--threads", side.removeprefix("local-t")]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        wall = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"{side} failed:\n{r.stderr}")
        rate = float(re.search(r"([0-9.]+) images/s", r.stdout)[1])
        images = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
        reference = reference or images
        diff = max(int(np.abs(_pixels(images[k]) - _pixels(reference[k])).max()) for k in reference)
        results[side] = {"images_per_second": rate, "process_wall_s": round(wall, 2), "images": len(images),
                         "same_bytes_as_first_side": images == reference, "max_pixel_diff_vs_first_side": diff,
                         "summary": r.stdout.strip()}
        print(f"{side:<9} {rate:6.2f} images/s   process {wall:6.1f} s   same bytes as {a.sides.split(',')[0]}: "
              f"{images == reference} (max pixel diff {diff})", flush=True)
    results["in_process_ray_1_actor"] = _batch_sizes(bundle, work, a)
    record = {"command": " ".join(sys.argv), "preset": a.preset, "trials": a.trials, "steps": a.steps,
              "machine": {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": len(os.sched_getaffinity(0))},
              "results": results}
    name = re.sub(r"[^a-z0-9]+", "-", cpu_name().lower()).strip("-")[:40]
    dest = ROOT / "benchmarks" / "results" / f"jobs-{name}-{a.preset}.json"
    dest.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
