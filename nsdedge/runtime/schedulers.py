"""Schedulers in numpy, matching diffusers' classes of the same name step for step (default options).

Notation (DDIM, Song et al. 2020; DPM-Solver++, Lu et al. 2022; Karras et al. 2022):
    alpha_bar_t   cumulative product of (1 - beta)              `ac[t]`
    sigma_t       sqrt((1 - alpha_bar_t) / alpha_bar_t)         Euler / DPM noise level
    lambda_t      log(alpha_t) - log(sigma_t), alpha_t = 1/sqrt(1 + sigma^2)   DPM-Solver's half log-SNR
    eps           the UNet's noise prediction; x0 the predicted clean latent

Each scheduler: `set_timesteps(n)`, `.timesteps` (what the UNet sees), `.init_noise_sigma`,
`scale_model_input(x, i)`, `step(eps, i, x) -> x_prev`, with `i` the index into `.timesteps`. A `stochastic`
one (LCM) takes fresh unit noise before every step but the last: `step(eps, i, x, noise)`.
Leaf module: numpy only.
"""

from __future__ import annotations

import numpy as np

NAMES = ("ddim", "dpm", "euler", "lcm", "ddim-trailing")


def alphas_cumprod(config: dict) -> np.ndarray:
    """alpha_bar over the training timesteps, in float32 as diffusers keeps it."""
    n = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float32) ** 2
    elif schedule == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float32)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported (scaled_linear, linear)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError("only epsilon-prediction models are supported")
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)


class _Schedule:
    """What every scheduler reads off the config; `default_spacing` is each diffusers class's own default."""

    default_spacing = "linspace"
    init_noise_sigma = 1.0
    stochastic = False

    def __init__(self, config: dict):
        self.config = dict(config)
        self.ac = alphas_cumprod(config)
        self.n_train = len(self.ac)
        self.spacing = config.get("timestep_spacing", self.default_spacing)
        self.offset = int(config.get("steps_offset", 0))


class DDIM(_Schedule):
    """diffusers DDIMScheduler, eta 0, no clipping or thresholding; timestep_spacing 'leading' by default."""

    default_spacing = "leading"

    def __init__(self, config: dict):
        super().__init__(config)
        self.final_ac = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.ac[0]

    def set_timesteps(self, n: int) -> None:
        self.n = n
        if self.spacing == "leading":
            ratio = self.n_train // n
            ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + self.offset
        elif self.spacing == "trailing":
            ts = _trailing(self.n_train, n).astype(np.int64)
        else:  # linspace
            ts = np.linspace(0, self.n_train - 1, n).round()[::-1].astype(np.int64)
        self.timesteps = ts

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    def step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        t = int(self.timesteps[i])
        prev_t = t - self.n_train // self.n
        a_t = np.float64(self.ac[t])
        a_prev = np.float64(self.ac[prev_t] if prev_t >= 0 else self.final_ac)
        x0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)                       # predicted x_0
        return (np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps).astype(np.float32)


def _trailing(n_train: int, n: int) -> np.ndarray:
    """diffusers' "trailing" spacing, round(arange(n_train, 0, -n_train / n)) - 1, cut to its n steps: for some n
    (61, ...) float rounding gives arange one more element, a timestep of -1 (diffusers then runs n + 1 steps, the
    last with alpha_bar[-1], the noisiest)."""
    return (np.round(np.arange(n_train, 0, -n_train / n)) - 1)[:n]


def _interp_sigmas(ac: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    sig = ((1 - ac) / ac) ** 0.5
    out = np.interp(timesteps, np.arange(len(sig)), sig)
    return np.concatenate([out, [0.0]]).astype(np.float32)              # final sigma 0 ("zero")


class Euler(_Schedule):
    """diffusers EulerDiscreteScheduler: linspace spacing, linear sigma interpolation, no churn."""

    def set_timesteps(self, n: int) -> None:
        if self.spacing == "linspace":
            ts = np.linspace(0, self.n_train - 1, n, dtype=np.float32)[::-1].copy()
        elif self.spacing == "leading":
            ratio = self.n_train // n
            ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.float32) + self.offset
        else:  # trailing
            ts = _trailing(self.n_train, n).astype(np.float32)
        self.sigmas = _interp_sigmas(self.ac, ts)
        self.timesteps = ts.astype(np.float32)
        max_sigma = float(self.sigmas.max())
        self.init_noise_sigma = max_sigma if self.spacing in ("linspace", "trailing") else (max_sigma ** 2 + 1) ** 0.5

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        s = np.float32(self.sigmas[i])
        return (x / np.sqrt(s * s + np.float32(1))).astype(np.float32)

    def step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        s, s_next = np.float32(self.sigmas[i]), np.float32(self.sigmas[i + 1])
        x = x.astype(np.float32)
        x0 = x - s * eps                                                         # predicted x_0
        derivative = (x - x0) / s
        return (x + derivative * (s_next - s)).astype(np.float32)


class DPMSolverPP2M(_Schedule):
    """diffusers DPMSolverMultistepScheduler: DPM-Solver++ (2M), midpoint, lower-order final, final sigma 0."""

    order = 2

    def set_timesteps(self, n: int) -> None:
        if self.spacing == "linspace":
            ts = np.linspace(0, self.n_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif self.spacing == "leading":
            ratio = self.n_train // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + self.offset
        else:  # trailing
            ts = _trailing(self.n_train, n).astype(np.int64)
        self.timesteps = ts
        self.sigmas = _interp_sigmas(self.ac, ts)
        self.outputs: list[np.ndarray | None] = [None] * self.order
        self.lower_order_nums = 0

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        return alpha, sigma * alpha

    def _lambda(self, sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
        a, s = self._alpha_sigma(sigma)
        with np.errstate(divide="ignore"):
            return a, s, np.log(a) - np.log(s)

    def step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        n = len(self.timesteps)
        lower_final = i == n - 1      # final_sigmas_type "zero" ends first order (with order 2 nothing else lowers)
        a_s0, s_s0, lam_s0 = self._lambda(self.sigmas[i])
        x = x.astype(np.float32)
        x0 = (x - s_s0 * eps) / a_s0                                            # data prediction (++)
        self.outputs = [*self.outputs[1:], x0]
        a_t, s_t, lam_t = self._lambda(self.sigmas[i + 1])
        h = lam_t - lam_s0
        with np.errstate(over="ignore", invalid="ignore"):
            ratio = s_t / s_s0
            em1 = np.expm1(-h) if np.isfinite(h) else np.float32(-1)            # exp(-h) - 1
        if self.lower_order_nums < 1 or lower_final:
            out = ratio * x - a_t * em1 * x0
        else:
            _, _, lam_s1 = self._lambda(self.sigmas[i - 1])
            r0 = (lam_s0 - lam_s1) / h
            d0, d1 = self.outputs[-1], (self.outputs[-1] - self.outputs[-2]) / r0
            out = ratio * x - a_t * em1 * d0 - 0.5 * (a_t * em1) * d1
        if self.lower_order_nums < self.order:
            self.lower_order_nums += 1
        return out.astype(np.float32)


class LCM(_Schedule):
    """diffusers LCMScheduler (Luo et al. 2023), epsilon prediction, no clipping: the consistency function
    f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with c_skip = s^2 / ((k t)^2 + s^2), c_out = k t / sqrt((k t)^2 + s^2),
    s = sigma_data 0.5, k = timestep_scaling 10; then back to the next timestep with fresh noise, except after
    the last step. Timesteps: n of the `original_inference_steps` (50) skipping schedule t = 20 j - 1, evenly by
    index from 999 down (4 steps: 999, 759, 499, 259); `timestep_spacing` does not apply."""

    stochastic = True
    sigma_data = 0.5

    def __init__(self, config: dict):
        super().__init__(config)
        self.original_steps = int(config.get("original_inference_steps", 50))
        self.timestep_scaling = float(config.get("timestep_scaling", 10.0))
        self.final_ac = np.float32(1.0) if config.get("set_alpha_to_one", True) else self.ac[0]

    def set_timesteps(self, n: int) -> None:
        if n > self.original_steps:
            raise ValueError(f"lcm takes at most {self.original_steps} steps (its original_inference_steps), got {n}")
        k = self.n_train // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]                 # 999, 979, ..., 19
        self.timesteps = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    def step(self, eps: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        last = i == len(self.timesteps) - 1
        t = int(self.timesteps[i])
        prev_t = t if last else int(self.timesteps[i + 1])
        a_t = np.float64(self.ac[t])
        a_prev = np.float64(self.ac[prev_t] if prev_t >= 0 else self.final_ac)
        kt = t * self.timestep_scaling
        c_skip = self.sigma_data ** 2 / (kt ** 2 + self.sigma_data ** 2)
        c_out = kt / (kt ** 2 + self.sigma_data ** 2) ** 0.5
        x0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)                       # predicted x_0
        denoised = c_out * x0 + c_skip * x
        if last:
            return denoised.astype(np.float32)
        if noise is None:
            raise ValueError("lcm needs fresh noise for every step but the last")
        return (np.sqrt(a_prev) * denoised + np.sqrt(1.0 - a_prev) * noise).astype(np.float32)


def make_scheduler(name: str, config: dict, steps: int):
    """A scheduler by its nsdedge name, configured from the bundle's (SD 1.5) scheduler config.
    `ddim-trailing` is DDIM with timestep_spacing "trailing" (what Hyper-SD and TCD LoRAs are distilled for)."""
    classes = {"ddim": DDIM, "dpm": DPMSolverPP2M, "euler": Euler, "lcm": LCM, "ddim-trailing": DDIM}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r} (choose from {', '.join(NAMES)})")
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if name == "ddim-trailing":
        config = {**config, "timestep_spacing": "trailing"}
    s = classes[name](config)
    if steps <= s.n_train:                # (never more timesteps than the model was trained with: no huge arrays)
        s.set_timesteps(int(steps))
        if _distinct_in_range(s):
            return s
    fits = 1                              # too many steps: timesteps would repeat or leave the training range
    for n in range(min(int(steps) - 1, s.n_train), 1, -1):
        s.set_timesteps(n)
        if _distinct_in_range(s):
            fits = n
            break
    raise ValueError(f"{name} cannot take {steps} steps with this model's {s.n_train} training timesteps "
                     f"(at most {fits})")


def _distinct_in_range(s: _Schedule) -> bool:
    """Every timestep inside [0, n_train) and each below the one before (none repeated)."""
    t = np.asarray(s.timesteps, np.float64)
    return bool(t.size and t.min() >= 0 and t.max() <= s.n_train - 1 and (np.diff(t) < 0).all())
