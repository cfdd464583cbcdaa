"""Jobs on the local backend and on a local Ray (2 CPUs): the same bytes whatever the backend and the number of
actors, resume, a killed actor, bad job specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nsdedge import jobs
from nsdedge.errors import InputError, NsdedgeError
from nsdedge.jobs import read_job, run_job
from tests.conftest import run_cli

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (starting one takes seconds); run_job uses it and leaves it running."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, two_subject_bundle) -> Path:
    """Two subjects of different voxel counts: rows 1:5 of a 6-trial synth01 file, and all 3 trials of subj02 with a
    seed of their own."""
    root = tmp_path_factory.mktemp("job")
    rng = np.random.default_rng(11)
    np.save(root / "s1.npy", rng.standard_normal((6, 256)))                 # float64, as NSD's files
    np.save(root / "s2.npy", rng.standard_normal((3, 48)).astype(np.float32))
    (root / "job.json").write_text(json.dumps({
        "bundle": str(two_subject_bundle), "settings": {"steps": 2, "guidance": 3.0},
        "work": [{"voxels": "s1.npy", "subject": "synth01", "trials": "1:5", "out": "out/synth01"},
                 {"voxels": "s2.npy", "subject": "subj02", "seed": 7, "out": "out/subj02"}]}))
    return root / "job.json"


def _images(out: Path) -> dict[str, bytes]:
    return {f"{d.name}/{p.name}": p.read_bytes() for d in sorted(out.iterdir()) for p in sorted(d.glob("*.png"))}


def _job(job_file: Path, out: Path):
    job = read_job(job_file)
    for i, w in enumerate(job.work):
        job.work[i] = jobs.Work(w.voxels, w.subject, out / Path(w.out).name, w.trials, w.seed)
    return job


@pytest.fixture(scope="module")
def local_images(job_file, two_subject_bundle, tmp_path_factory) -> dict[str, bytes]:
    """The job run locally through the CLI, checked against plain `nsdedge run` of the same rows. One inference
    thread, as each Ray actor here has (equal thread counts give equal bytes; jobs.py)."""
    r = run_cli("run", "--job", str(job_file), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote 7 image(s), skipped 0" in r.stdout
    got = _images(job_file.parent / "out")
    assert sorted(got) == [f"subj02/{i:04d}.png" for i in range(3)] + [f"synth01/{i:04d}.png" for i in range(1, 5)]
    plain = tmp_path_factory.mktemp("plain")
    r = run_cli("run", "--voxels", str(job_file.parent / "s2.npy"), "--bundle", str(two_subject_bundle), "--subject",
                "subj02", "--seed", "7", "--steps", "2", "--guidance", "3", "--threads", "1", "--out", str(plain))
    assert r.returncode == 0, r.stderr
    assert {f"subj02/{p.name}": p.read_bytes() for p in plain.glob("*.png")} == \
        {k: v for k, v in got.items() if k.startswith("subj02/")}
    return got


@pytest.mark.parametrize("actors", [1, 2])
def test_ray_writes_the_bytes_of_a_local_run(ray_local, job_file, local_images, tmp_path, actors):
    result = run_job(_job(job_file, tmp_path), "ray", actors=actors, batch_size=2)
    assert (result.written, result.skipped, result.failed) == (7, 0, [])
    assert _images(tmp_path) == local_images
    record = json.loads((tmp_path / "subj02" / "nsdedge-run.json").read_text())
    assert record["key"]["seed"] == 7 and record["key"]["provider"] == "cpu" and record["key"]["steps"] == 2

    @ray.remote(num_cpus=1)
    def actor_imports():                       # what a worker holds after loading the actor's code and a bundle
        from nsdedge.jobs import Shard          # noqa: F401
        from nsdedge.runtime import Reconstructor
        Reconstructor(tiny, "cpu").decode(np.zeros((1, 256), np.float32), "synth01")
        return "torch" in sys.modules
    tiny = str(read_job(job_file).bundle)
    assert ray.get(actor_imports.remote()) is False                   # the runtime stays torch-free in actors


def test_resume_and_refused_reruns(ray_local, job_file, local_images, tmp_path, tiny_bundle):
    job = _job(job_file, tmp_path)
    run_job(job, "ray", actors=2, batch_size=3)
    for name in ("synth01/0002.png", "subj02/0000.png"):
        (tmp_path / name).unlink()
    again = run_job(job, "ray", actors=2, batch_size=3)
    assert (again.written, again.skipped) == (2, 5) and _images(tmp_path) == local_images
    assert run_job(job, "local").written == 0
    job.steps = 3                                                    # other settings: refused, nothing written
    with pytest.raises(InputError, match="other settings"):
        run_job(job, "ray", actors=1)
    job.steps, job.bundle = 2, tiny_bundle                           # another bundle (manifest hash)
    job.work = [jobs.Work(job_file.parent / "s1.npy", "subj01", tmp_path / "synth01", "1:5")]
    with pytest.raises(InputError, match="bundle_manifest_sha256|subject"):
        run_job(job, "ray", actors=1)
    assert _images(tmp_path) == local_images


class ExitOnSecondBatch(jobs.Shard):
    """An actor process that dies (os._exit, as a lost node) on its second batch, once per job (a marker file)."""

    marker: str = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)
        return super().__call__(batch)


def test_a_killed_actor_loses_and_duplicates_nothing(ray_local, job_file, local_images, tmp_path, monkeypatch):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])      # the subclass travels to the workers
    marker = tmp_path / "died"
    monkeypatch.setattr(ExitOnSecondBatch, "marker", str(marker))
    monkeypatch.setattr(jobs, "Shard", ExitOnSecondBatch)
    out = tmp_path / "out"
    try:
        first = run_job(_job(job_file, out), "ray", actors=2, batch_size=1)
        assert first.written + first.skipped == 7                # Ray restarted the actor and retried its batch
    except NsdedgeError as e:                                     # or the job stopped in one line ...
        assert "run it again" in str(e)
    assert marker.exists()                                        # the fault happened
    monkeypatch.setattr(jobs, "Shard", jobs.Shard)
    rerun = run_job(_job(job_file, out), "ray", actors=2, batch_size=1)   # ... and the rerun completes it
    assert rerun.failed == [] and _images(out) == local_images
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]     # no partial files left behind


class WritesItsEnvironment(jobs.Shard):
    """An actor that writes down, as it starts, what it has of the variables in `names`."""

    marker: str = ""
    names: tuple = ()

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        Path(self.marker, str(os.getpid())).write_text(json.dumps({k: os.environ.get(k) for k in self.names}))


def test_actors_get_the_drivers_environment(ray_local, job_file, local_images, tmp_path, monkeypatch):
    """A Ray started elsewhere starts its workers with its own environment: the actors get the driver's
    ORT_DISABLE_TELEMETRY through runtime_env (here a variable the running Ray's workers cannot have otherwise)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setenv("NSDEDGE_TEST_DRIVER_ONLY", "from the driver")
    monkeypatch.setattr(jobs, "ACTOR_ENV", (*jobs.ACTOR_ENV, "NSDEDGE_TEST_DRIVER_ONLY"))
    monkeypatch.setattr(WritesItsEnvironment, "marker", str(tmp_path))
    monkeypatch.setattr(WritesItsEnvironment, "names", jobs.ACTOR_ENV)
    monkeypatch.setattr(jobs, "Shard", WritesItsEnvironment)
    result = run_job(_job(job_file, tmp_path / "out"), "ray", actors=1, batch_size=4)
    assert result.written == 7 and _images(tmp_path / "out") == local_images
    (seen,) = [json.loads(p.read_text()) for p in tmp_path.iterdir() if p.is_file()]
    assert seen == {"ORT_DISABLE_TELEMETRY": "1", "NSDEDGE_TEST_DRIVER_ONLY": "from the driver"}
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY")
    monkeypatch.delenv("NSDEDGE_TEST_DRIVER_ONLY")
    assert jobs._actor_env() == {}                                 # nothing set, nothing passed: Ray's own rules


def test_cli_ray_backend_and_bad_job_specs(job_file, local_images, two_subject_bundle, tmp_path):
    (tmp_path / "s1.npy").write_bytes((job_file.parent / "s1.npy").read_bytes())
    r = run_cli("run", "--voxels", str(tmp_path / "s1.npy"), "--bundle", str(two_subject_bundle), "--subject",
                "synth01", "--trials", "1:5", "--steps", "2", "--guidance", "3", "--backend", "ray", "--actors", "2",
                "--out", str(tmp_path / "o"), env={"RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr
    assert "wrote 4 image(s)" in r.stdout and "images/s" in r.stdout and str(tmp_path / "o") in r.stdout
    assert {f"synth01/{p.name}": p.read_bytes() for p in (tmp_path / "o").glob("*.png")} == \
        {k: v for k, v in local_images.items() if k.startswith("synth01/")}

    bad = {"not-json": "{", "no-work": json.dumps({"work": []}),
           "unknown-key": json.dumps({"work": [{"voxels": "s1.npy"}], "oops": 1}),
           "missing-voxels": json.dumps({"bundle": str(two_subject_bundle), "work": [{"voxels": "nope.npy"}]}),
           "wrong-length": json.dumps({"bundle": str(two_subject_bundle),
                                       "work": [{"voxels": "s1.npy", "subject": "subj02"}]}),
           "same-out": json.dumps({"bundle": str(two_subject_bundle),
                                   "work": [{"voxels": "s1.npy", "subject": "synth01", "out": "x"},
                                            {"voxels": "s1.npy", "subject": "synth01", "out": "x"}]})}
    says = {"not-json": "not a readable JSON job file", "no-work": "non-empty list", "unknown-key": "unknown key",
            "missing-voxels": "no such file", "wrong-length": "expects 48", "same-out": "two work items write to"}
    for name, text in bad.items():
        (tmp_path / f"{name}.json").write_text(text)
        r = run_cli("run", "--job", str(tmp_path / f"{name}.json"), "--backend", "ray")
        assert r.returncode == 2 and says[name] in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name,
                                                                                                           r.stderr)
    r = run_cli("run", "--voxels", str(tmp_path / "s1.npy"), "--actors", "2")
    assert r.returncode == 2 and "need --backend ray" in r.stderr
    r = run_cli("run", "--job", str(job_file), "--out", str(tmp_path / "elsewhere"))
    assert r.returncode == 2 and "belong to each work item" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["o"]          # nothing else written
    code = ("import sys; sys.modules['ray'] = None; from nsdedge.cli import main; sys.argv = ['nsdedge', 'run', "
            f"'--job', {str(job_file)!r}, '--backend', 'ray']; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "pip install 'nsdedge[ray]'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
