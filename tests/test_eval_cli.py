"""`nsdedge eval`: pixel metrics against scikit-image, feature metrics through tiny random networks of the
real classes saved under the real file names, contact sheet, fidelity mode, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from nsdedge.eval.images import ImageSet, resize
from nsdedge.eval.metrics import PRESETS, evaluate, gray_ssim, pixcorr


def smooth_images(n: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: random low-frequency pictures (noise upsampled), so that resizing keeps them apart."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (n, 6, 6, 3)).astype(np.float32)
    return np.stack([np.clip(resize(x, size) * 255 + 0.5, 0, 255).astype(np.uint8) for x in small])


def test_pixel_metrics_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    color = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (40, 40, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ref = metrics.structural_similarity(color.rgb2gray(a), color.rgb2gray(b), gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0)
    assert abs(gray_ssim(a, b) - ref) < 1e-9
    assert abs(pixcorr(a, b) - np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 1e-12


def test_image_set_memory_maps_npy_and_reads_run_directories(tmp_path):
    from PIL import Image

    imgs = smooth_images(5)
    np.save(tmp_path / "stim.npy", imgs)
    s = ImageSet(tmp_path / "stim.npy")
    assert isinstance(s._array, np.memmap) and len(s) == 5
    np.testing.assert_array_equal(s.read([3]), imgs[3:4] / np.float32(255))
    d = tmp_path / "run"
    d.mkdir()
    for i in (1, 4):                                   # `nsdedge run` names: 0001.png is trial 1
        Image.fromarray(imgs[i]).save(d / f"{i:04d}.png")
    r = ImageSet(d)
    assert r.keys == [1, 4]
    np.testing.assert_array_equal(r.read([4]), s.read([4]))
    # channel-first float input, as MindEye keeps its images
    np.save(tmp_path / "chw.npy", (imgs.transpose(0, 3, 1, 2) / 255.0).astype(np.float32))
    np.testing.assert_allclose(ImageSet(tmp_path / "chw.npy").read([2]), s.read([2]), atol=1e-6)


def test_pixel_metrics_known_answers(tmp_path):
    imgs = smooth_images(12)
    np.save(tmp_path / "a.npy", imgs)
    np.save(tmp_path / "shuffled.npy", imgs[np.roll(np.arange(12), 1)])
    same = evaluate(ImageSet(tmp_path / "a.npy"), ImageSet(tmp_path / "a.npy"), fidelity=True)
    assert same["metrics"]["PixCorr"] == pytest.approx(1.0)
    assert same["metrics"]["SSIM"] == pytest.approx(1.0)
    assert same["metrics"]["PSNR"] == float("inf")
    other = evaluate(ImageSet(tmp_path / "shuffled.npy"), ImageSet(tmp_path / "a.npy"))
    assert other["metrics"]["PixCorr"] < 0.5 and other["metrics"]["SSIM"] < 0.9
    assert other["metrics"]["AlexNet(2)"] is None and set(other["skipped"]) == {"alexnet", "inception", "clip",
                                                                                  "effnet", "swav"}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """Random networks of the real classes, saved under the file names torchvision / SwAV / CLIP use."""
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    d = tmp_path_factory.mktemp("eval-weights")
    torch.manual_seed(0)
    torch.save(models.alexnet().state_dict(), d / "alexnet-owt-7be5be79.pth")
    torch.save(models.inception_v3(aux_logits=True, init_weights=True).state_dict(),
               d / "inception_v3_google-0cc3c7bd.pth")
    torch.save(models.efficientnet_b1().state_dict(), d / "efficientnet_b1-c27df63c.pth")
    # SwAV's release: a DataParallel ResNet-50 backbone without fc, plus its projection head and prototypes
    swav = {f"module.{k}": v for k, v in models.resnet50().state_dict().items() if not k.startswith("fc.")}
    swav["module.projection_head.0.weight"] = torch.randn(16, 2048)
    swav["module.prototypes.weight"] = torch.randn(30, 16)
    torch.save(swav, d / "swav_800ep_pretrain.pth.tar")
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=10, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(d / "clip-vit-large-patch14")
    return d


def test_feature_metrics_known_answers(tmp_path, weights_dir):
    imgs = smooth_images(8)
    np.save(tmp_path / "a.npy", imgs)
    a = ImageSet(tmp_path / "a.npy")
    same = evaluate(a, a, weights_dir=weights_dir, batch=5)       # two batches: features are concatenated
    m = same["metrics"]
    assert same["skipped"] == {} and same["n"] == 8
    for name in ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP"):
        assert m[name] == 1.0, name
    assert m["EffNet-B"] == pytest.approx(0.0, abs=1e-6) and m["SwAV"] == pytest.approx(0.0, abs=1e-6)
    np.save(tmp_path / "noise.npy", np.random.default_rng(3).integers(0, 256, imgs.shape, dtype=np.uint8))
    other = evaluate(ImageSet(tmp_path / "noise.npy"), a, weights_dir=weights_dir, preset="braindiffuser")
    assert other["preset"] == "braindiffuser"
    assert other["metrics"]["EffNet-B"] > 0.01 and other["metrics"]["SwAV"] > 1e-4   # random ResNet: near-constant
    assert all(other["metrics"][k] < 1.0 for k in ("AlexNet(2)", "InceptionV3"))


def test_feature_extractor_equals_torchvision_forward(weights_dir):
    """The extractor's AlexNet(5) features are torchvision's own model run on the preset's preprocessing."""
    torch = pytest.importorskip("torch")
    from torchvision.models import alexnet

    from nsdedge.eval.features import NETWORKS, FeatureExtractor

    ex = FeatureExtractor(NETWORKS["alexnet"], weights_dir / "alexnet-owt-7be5be79.pth")
    imgs = smooth_images(2, size=PRESETS["mindeye"].sizes["alexnet"]).astype(np.float32) / 255
    m = alexnet()
    m.load_state_dict(torch.load(weights_dir / "alexnet-owt-7be5be79.pth", weights_only=True))
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = m.features[:12](x).flatten(1).numpy()      # features.11 is the ReLU after conv 5 (256 x 15 x 15)
    np.testing.assert_allclose(ex(imgs, 256)["features.11"], ref, rtol=1e-5, atol=1e-5)


def test_cli_eval_run_output_json_and_sheet(tmp_path, weights_dir):
    from PIL import Image

    imgs = smooth_images(6)
    np.save(tmp_path / "stim.npy", imgs)
    run = tmp_path / "recons"
    run.mkdir()
    for i in range(6):
        Image.fromarray(imgs[i]).save(run / f"{i:04d}.png")
    r = run_cli("eval", "--recons", str(run), "--stimuli", str(tmp_path / "stim.npy"), "--weights-dir",
                str(weights_dir), "--json", str(tmp_path / "m.json"), "--sheet", str(tmp_path / "sheet.png"))
    assert r.returncode == 0, r.stderr
    assert "PixCorr" in r.stdout and "100.00%" in r.stdout
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["preset"] == "mindeye" and out["mode"] == "stimuli" and out["n"] == 6
    assert out["metrics"]["CLIP"] == 1.0
    with Image.open(tmp_path / "sheet.png") as im:
        sheet = np.asarray(im)
    assert sheet.shape[0] > 2 * 128 and sheet.shape[1] > 6 * 128
    np.testing.assert_array_equal(sheet[4:132, 4:132], sheet[136:264, 4:132])   # stimulus above its recon


def test_cli_eval_missing_weights_still_gives_pixel_metrics(tmp_path):
    imgs = smooth_images(4)
    np.save(tmp_path / "a.npy", imgs)
    np.save(tmp_path / "b.npy", imgs[::-1].copy())
    empty = tmp_path / "w"
    empty.mkdir()
    r = run_cli("eval", "--recons", str(tmp_path / "b.npy"), "--reference", str(tmp_path / "a.npy"),
                "--weights-dir", str(empty), "--preset", "braindiffuser", "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    assert "alexnet-owt-7be5be79.pth" in r.stderr and "clip-vit-large-patch14" in r.stderr
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["mode"] == "fidelity" and out["preset"] == "braindiffuser"
    assert out["metrics"]["AlexNet(2)"] is None and out["metrics"]["PixCorr"] is not None
    assert out["metrics"]["PSNR"] < 30


@pytest.mark.parametrize("case", ["both", "index", "pickle", "shape", "wrong-weights"])
def test_cli_eval_bad_input(tmp_path, case, weights_dir):
    imgs = smooth_images(3)
    np.save(tmp_path / "a.npy", imgs)
    args = ["eval", "--recons", str(tmp_path / "a.npy"), "--stimuli", str(tmp_path / "a.npy")]
    if case == "both":
        args += ["--reference", str(tmp_path / "a.npy")]
    elif case == "index":
        from PIL import Image

        (tmp_path / "r").mkdir()
        Image.fromarray(imgs[0]).save(tmp_path / "r" / "0007.png")
        args[2] = str(tmp_path / "r")
    elif case == "pickle":
        np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        args[2] = str(tmp_path / "p.npy")
    elif case == "shape":
        np.save(tmp_path / "s.npy", np.zeros((3, 4, 4, 5), np.uint8))
        args[2] = str(tmp_path / "s.npy")
    else:
        import shutil

        w = tmp_path / "w"
        w.mkdir()
        shutil.copy(weights_dir / "alexnet-owt-7be5be79.pth", w / "inception_v3_google-0cc3c7bd.pth")
        args += ["--weights-dir", str(w)]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert len(lines) == 1 or (case == "wrong-weights" and lines[0].startswith("note: "))
    if case == "wrong-weights":
        assert "inception_v3_google-0cc3c7bd.pth: not inception weights" in lines[-1]


def test_feature_two_way_against_shuffled_copy_is_about_chance(tmp_path, weights_dir):
    """Each reconstruction is another stimulus (a derangement): identification falls to about 50 %."""
    from nsdedge.eval.metrics import METRICS

    imgs = smooth_images(24, seed=5)
    np.save(tmp_path / "a.npy", imgs)
    np.save(tmp_path / "shuffled.npy", imgs[np.roll(np.arange(24), 7)])
    alex = tuple(m for m in METRICS if m.network == "alexnet")
    r = evaluate(ImageSet(tmp_path / "shuffled.npy"), ImageSet(tmp_path / "a.npy"), weights_dir=weights_dir,
                 metrics=alex)
    assert 0.25 < r["metrics"]["AlexNet(2)"] < 0.75 and 0.25 < r["metrics"]["AlexNet(5)"] < 0.75
    same = evaluate(ImageSet(tmp_path / "a.npy"), ImageSet(tmp_path / "a.npy"), weights_dir=weights_dir, metrics=alex)
    assert same["metrics"]["AlexNet(2)"] == 1.0
