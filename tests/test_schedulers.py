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
    for steps in (2.5, True, "4"):
        with pytest.raises(ValueError, match="whole number"):
            make_scheduler("ddim", SD15_SCHEDULER_CONFIG, steps)


@pytest.mark.parametrize("name,most", [("ddim", 999), ("dpm", 999), ("ddim-trailing", 1000), ("euler", 1000)])
def test_more_steps_than_the_model_has_timesteps_are_refused(name, most):
    # SD 1.5's ddim with steps_offset 1 would index timestep 1000 at 1000 steps; dpm's would repeat (NaN)
    assert len(make_scheduler(name, SD15_SCHEDULER_CONFIG, most).timesteps) == most
    with pytest.raises(ValueError, match=rf"cannot take {most + 1} steps .*\(at most {most}\)"):
        make_scheduler(name, SD15_SCHEDULER_CONFIG, most + 1)
    with pytest.raises(ValueError, match="at most"):
        make_scheduler(name, SD15_SCHEDULER_CONFIG, 10 ** 12)       # refused before any array of that length


@pytest.mark.parametrize("name", ["ddim-trailing", "euler", "dpm"])
def test_trailing_spacing_gives_exactly_the_steps_asked_for(name):
    # float rounding makes diffusers' arange one longer for some counts (61: a 62nd timestep of -1)
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "trailing"}
    for n in (4, 61, 333, 999):
        t = make_scheduler(name, config, n).timesteps
        assert len(t) == n and t.min() >= 0 and t[0] == 999


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(steps, monkeypatch):
    """LCMScheduler with the noise it draws replaced by ours: the same timesteps and samples, step for step."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_lcm as lcm_module

    ref = diffusers.LCMScheduler.from_config({"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG})
    ref.set_timesteps(steps)
    ours = make_scheduler("lcm", SD15_SCHEDULER_CONFIG, steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    if steps == 4:
        assert ours.timesteps.tolist() == [999, 759, 499, 259]
    assert ours.init_noise_sigma == float(ref.init_noise_sigma) == 1.0 and ours.stochastic
    rng = np.random.default_rng(1)
    noises = [rng.standard_normal((2, 4, 8, 8), dtype=np.float32) for _ in range(steps)]
    drawn = []

    def noise(shape, generator=None, device=None, dtype=None):
        drawn.append(len(drawn))
        return torch.from_numpy(noises[len(drawn) - 1])
    monkeypatch.setattr(lcm_module, "randn_tensor", noise)
    x0 = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    xr, xo = torch.from_numpy(x0.copy()), x0.copy()
    for i, t in enumerate(ref.timesteps):
        e = _model(xo, ours.timesteps[i])
        xr = ref.step(torch.from_numpy(_model(xr.numpy(), t)), t, xr).prev_sample
        xo = ours.step(e, i, xo, noises[i] if i < steps - 1 else None)
        err = np.linalg.norm(xr.numpy() - xo) / np.linalg.norm(xr.numpy())
        assert err < 1e-5, (steps, i, err)
    assert len(drawn) == steps - 1                        # no noise after the last step


def test_ddim_trailing_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
    for steps in (1, 2, 4, 8):
        ref.set_timesteps(steps)
        ours = make_scheduler("ddim-trailing", SD15_SCHEDULER_CONFIG, steps)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
        xr = torch.from_numpy(x.copy())
        for i, t in enumerate(ref.timesteps):
            xr = ref.step(torch.from_numpy(_model(xr.numpy(), t)), t, xr).prev_sample
            x = ours.step(_model(x, ours.timesteps[i]), i, x)
        assert np.linalg.norm(xr.numpy() - x) / np.linalg.norm(xr.numpy()) < 1e-5
    with pytest.raises(ValueError, match="at most 50"):
        make_scheduler("lcm", SD15_SCHEDULER_CONFIG, 51)
