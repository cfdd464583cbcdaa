import json

from tests.conftest import run_cli


def test_bench_reports_every_stage(tiny_bundle, tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--steps", "2", "--runs", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert set(d["stages"]) == {"decoder", "unet_step_b1", "unet_step_b2", "vae_decode", "end_to_end"}
    for s in d["stages"].values():
        assert 0 < s["min_s"] <= s["median_s"] <= s["p90_s"]
    assert d["stages"]["unet_step_b1"]["runs"] == 2 and d["stages"]["end_to_end"]["runs"] == 1
    assert d["peak_rss_mb"] > 10 and d["sizes_mb"]["total"] > 1 and d["provider"] == "cpu"
    assert d["versions"]["onnxruntime"] and d["machine"]["cores"] >= 1
    assert "unet_step_b2" in r.stdout and "peak RSS" in r.stdout
