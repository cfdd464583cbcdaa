"""One seam to the backends (runtime/session.py) and the arrows between packages."""

import re
import subprocess
import sys
import textwrap

import numpy as np

from nsdedge.runtime import Reconstructor
from nsdedge.runtime.ort_session import OrtSession
from nsdedge.runtime.session import Backend, open_graph, open_session
from nsdedge.runtime.trt_engine import EngineSession
from tests.conftest import ROOT

SOURCES = sorted([*(ROOT / "nsdedge").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def _files_matching(pattern):
    rx = re.compile(pattern)
    return sorted(str(p.relative_to(ROOT)) for p in SOURCES if rx.search(p.read_text()))


def test_every_engine_call_is_behind_the_seam():
    assert _files_matching(r"InferenceSession\(") == ["nsdedge/runtime/ort_session.py"]
    assert _files_matching(r"trt\.Runtime\(|trt\.Builder\(") == ["nsdedge/export/trt_build.py",
                                                                               "nsdedge/runtime/trt_engine.py"]
    assert _files_matching(r"\._session\(|\._release\(|\._sessions\b") == ["nsdedge/runtime/pipeline.py"]
    assert _files_matching(r"compile_model\(|\.Core\(\)") == ["nsdedge/runtime/ov_session.py"]


def test_backends_implement_the_protocol(tiny_bundle):
    sess = open_session(tiny_bundle, "unet", "cpu")
    assert isinstance(sess, OrtSession) and isinstance(sess, Backend) and sess.provider == "cpu"
    assert all(callable(getattr(EngineSession, m, None)) for m in ("run", "bound", "input_dtype"))
    rec = Reconstructor(tiny_bundle, "cpu")
    assert isinstance(rec.session("vae_decoder"), Backend)


def test_a_graph_in_the_bundle_folder_can_stand_in(tiny_bundle):
    """quantization compares a converted graph with the component's own through the same factory"""
    rng = np.random.default_rng(0)
    feeds = {"voxels": rng.standard_normal((2, 256)).astype(np.float32)}
    a = open_session(tiny_bundle, "decoder-subj01", "cpu").run(feeds)
    b = open_session(tiny_bundle, "decoder-subj01", "cpu", file="decoder-subj01.onnx").run(feeds)
    c = open_graph(tiny_bundle / "decoder-subj01.onnx", "cpu").run(feeds)
    assert np.array_equal(a["ip_tokens"], b["ip_tokens"]) and np.array_equal(a["ip_tokens"], c["ip_tokens"])


def test_runtime_and_eval_stand_alone(tiny_bundle, tmp_path):
    """runtime/ imports with torch absent; eval/ imports nothing from export/."""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["nsdedge.export"] = None
        for m in ("torch", "diffusers", "transformers"):
            sys.modules[m] = None
        import nsdedge.runtime.batch, nsdedge.runtime.session, nsdedge.runtime.trt_engine, nsdedge.bench
        from nsdedge.eval import features, images, metrics
        s = metrics.evaluate(images.ImageSet({str(tmp_path / "a.npy")!r}), images.ImageSet({str(tmp_path / "a.npy")!r}),
                             metrics=tuple(m for m in metrics.METRICS if not m.network))
        assert s["metrics"]["PixCorr"] > 0.999, s
        assert not [m for m in sys.modules if m.startswith("nsdedge.export.")]
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    imports = _files_matching(r"(?m)^\s*(from|import) (\.\.export|nsdedge\.export)")
    assert not [f for f in imports if f.startswith(("nsdedge/eval/", "nsdedge/runtime/"))]


def test_earlier_import_paths_still_work(tiny_bundle):
    import nsdedge.evaluate
    import nsdedge.features
    import nsdedge.images
    from nsdedge.engines import EngineSession as moved_runner
    from nsdedge.engines import build_engines, profile_shapes  # noqa: F401
    from nsdedge.eval import features, images, metrics
    from nsdedge.runtime.session import Session

    assert (nsdedge.evaluate, nsdedge.features, nsdedge.images) == (metrics, features, images)
    assert moved_runner is EngineSession and isinstance(Session(tiny_bundle / "unet.onnx", "auto"), OrtSession)
