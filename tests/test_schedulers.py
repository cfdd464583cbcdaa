"""numpy schedulers against diffusers' classes of the same name, step for step."""

import numpy as np
import pytest

from nsdedge.export.presets import SD15_SCHEDULER_CONFIG
from nsdedge.runtime.schedulers import make_scheduler


def _model(x, t):
    """A deterministic stand-in for the UNet that depends on both sample and timestep."""
    return (0.3 * np.tanh(x) + 0.05 * np.cos(float(t) / 100.0) * x).astype(np.float32)


@pytest.mark.parametrize("name", ["ddim", "dpm", "euler"])
@pytest.mark.parametrize("steps", [50, 20, 7, 1])
def test_matches_diffusers(name, steps):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cls = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler,
           "euler": diffusers.EulerDiscreteScheduler}[name]
    ref = cls.from_config({"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG})
    ref.set_timesteps(steps)
    ours = make_scheduler(name, SD15_SCHEDULER_CONFIG, steps)
    np.testing.assert_array_equal(ours.timesteps.astype(np.float64), ref.timesteps.numpy().astype(np.float64))
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)
    x0 = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    xr, xo = torch.from_numpy(x0) * ref.init_noise_sigma, x0 * np.float32(ours.init_noise_sigma)
    for i, t in enumerate(ref.timesteps):
        er = _model(ref.scale_model_input(xr, t).numpy(), t)
        eo = _model(ours.scale_model_input(xo, i), ours.timesteps[i])
        xr = ref.step(torch.from_numpy(er), t, xr).prev_sample
        xo = ours.step(eo, i, xo)
        err = np.linalg.norm(xr.numpy() - xo) / np.linalg.norm(xr.numpy())
        assert err < 1e-5, (name, steps, i, err)


def test_sd15_timesteps_known_values():
    assert make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 50).timesteps[:3].tolist() == [981, 961, 941]
    assert make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 50).timesteps[-1] == 1
    assert make_scheduler("dpm", SD15_SCHEDULER_CONFIG, 20).timesteps[0] == 999
    assert make_scheduler("euler", SD15_SCHEDULER_CONFIG, 20).init_noise_sigma == pytest.approx(14.6146, rel=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("pndm", SD15_SCHEDULER_CONFIG, 10)
    with pytest.raises(ValueError, match="steps"):
        make_scheduler("ddim", SD15_SCHEDULER_CONFIG, 0)
