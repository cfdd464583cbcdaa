"""voxels -> decoder -> ip tokens -> guided denoising loop -> VAE decoder -> uint8 images.

Shapes: voxels (N, V); tokens (N, 16, 768); latents (N, 4, H/f, W/f) with f the bundle's VAE factor;
images (N, H, W, 3) uint8. Every image is denoised on its own (batch 2 with guidance, 1 without), so
memory stays flat over long batches; image n of a call uses seed + n (its initial latent from PCG64 seeded
with seed + n; a stochastic scheduler's per-step noise from PCG64 seeded with SeedSequence(seed + n,
spawn_key=(1,))), so a resumed
batch gives the same bytes as an uninterrupted one.

Settings a call leaves out (None) come from the bundle's run defaults (a few-step bundle: lcm, 4 steps,
guidance 1, the tiny VAE), else from DEFAULTS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import CONSTANTS, Manifest, read_manifest
from ..errors import BundleError, InputError, NsdedgeError, first_line
from ..voxels import validate_voxels
from .schedulers import make_scheduler
from .session import Backend, bundle_provider, open_session, resolve

log = logging.getLogger(__name__)

FP32_VAE = "vae_decoder_fp32"     # fp16 bundles carry it for images whose fp16 decode overflows
VAES = {"full": "vae_decoder", "tiny": "taesd_decoder"}
DEFAULTS = {"steps": 20, "guidance": 7.5, "ip_scale": 1.0, "scheduler": "ddim", "vae": "full"}
SEED_LIMIT = 2 ** 63              # image i of a call uses seed + i: every such seed must stay below this

StepCallback = Callable[[int, int], None]       # (step done, steps in all)
# observer(component, inputs, outputs): sees what every graph is fed and returns (calibration, fidelity)
Observer = Callable[[str, dict, dict], None]


class Reconstructor:
    """A bundle, ready to run. `provider`: auto | cpu | cuda | tensorrt | engine (session.py).
    `low_memory`: one graph loaded at a time (a batch then runs stage by stage: see keep()); on the CUDA provider
    the two halves of a guided UNet batch also run one after the other, at batch 1 (split_guidance: half the
    activations; the images then differ from the normal mode's by a level or two, as batch 1 and 2 kernels round
    differently), with the UNet's CUDA graph and each graph in an arena of its own (session.LOW_MEMORY_*)."""

    def __init__(self, bundle: str | Path, provider: str = "auto", *, verify: bool = True,
                 low_memory: bool = False, threads: int | None = None, observer: Observer | None = None,
                 engine_cache: str | Path | None = None, engine_batches: tuple[int, ...] = (1, 2)):
        if provider != "auto":
            resolve(provider)                # a named provider that cannot start: said before the bundle is hashed
        self.path = Path(bundle)
        self.engine_cache = Path(engine_cache) if engine_cache else self.path / "engines"
        self.engine_batches = tuple(engine_batches)
        self.manifest: Manifest = read_manifest(self.path, verify=verify)
        self.provider = resolve(bundle_provider(self.manifest, provider))
        self.low_memory = low_memory
        self.split_guidance = low_memory and self.provider == "cuda"
        self.threads = threads
        self.observer = observer
        self._sessions: dict[str, Backend] = {}
        self._kept: set[str] = set()
        try:
            with np.load(self.path / CONSTANTS, allow_pickle=False) as c:
                self.prompt_embeds = c["prompt_embeds"].astype(np.float32)            # (1, 77, 768)
                self.negative_embeds = c["negative_prompt_embeds"].astype(np.float32)  # (1, 77, 768)
                self.uncond_tokens = c["uncond_ip_tokens"].astype(np.float32)         # (1, 16, 768)
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise BundleError(f"{self.path / CONSTANTS}: unreadable bundle constants ({type(e).__name__}: "
                              f"{first_line(e)})") from None
        ports = {p["name"]: p.get("shape") for p in self.manifest.components["unet"].inputs} \
            if "unet" in self.manifest.components else {}
        for name, port in [("prompt_embeds", "encoder_hidden_states"), ("negative_embeds", "encoder_hidden_states"),
                           ("uncond_tokens", "ip_tokens")]:          # (1, ...) as the UNet input takes it
            shape, want = getattr(self, name).shape, ports.get(port) or [1, None, None]
            if len(shape) != len(want) or shape[0] != 1 or any(isinstance(w, int) and w != d
                                                                for w, d in zip(want[1:], shape[1:])):
                raise BundleError(f"{self.path / CONSTANTS}: {name} of shape {shape} does not fit the UNet's "
                                  f"{port} {want}")
        log.info("bundle %s (%s) on provider %s", self.path, self.manifest.precision, self.provider)

    # -- sessions -----------------------------------------------------------------------------------
    def session(self, component: str) -> Backend:
        """The graph of `component` on this provider, opened on first use (low memory: only it, and the graphs
        kept, stay open)."""
        if component not in self._sessions:
            if self.low_memory:
                for name in [c for c in self._sessions if c not in self._kept]:
                    del self._sessions[name]
            self._sessions[component] = open_session(
                self.path, component, self.provider, manifest=self.manifest, low_memory=self.low_memory,
                threads=self.threads, engine_cache=self.engine_cache, engine_batches=self.engine_batches)
        return self._sessions[component]

    def release(self, component: str) -> None:
        """Low memory: close `component`'s graph after its stage, unless it is kept. Otherwise graphs stay open."""
        if self.low_memory and component not in self._kept:
            self._sessions.pop(component, None)

    @contextlib.contextmanager
    def keep(self, *components: str):
        """Within the block, `components` stay open between calls even in low-memory mode, and close after it:
        a batch runs stage-major (every trial's UNet loop with the UNet loaded, then every decode with the VAE
        loaded) instead of loading each graph once per image."""
        before = set(self._kept)
        self._kept |= set(components)
        try:
            yield self
        finally:
            self._kept = before
            for c in components:
                self.release(c)

    # -- subjects and decoding ----------------------------------------------------------------------
    @property
    def subjects(self) -> dict[str, int]:
        """subject -> voxel count."""
        return {s: int(self.manifest.components[c].extra["voxels"]) for s, c in self.manifest.subjects.items()}

    def subject(self, subject: str | None) -> str:
        subs = self.subjects
        if subject is None:
            if len(subs) != 1:
                raise InputError(f"bundle has subjects {', '.join(sorted(subs)) or 'none'}; choose one with --subject")
            return next(iter(subs))
        if subject not in subs:
            raise InputError(f"unknown subject {subject!r}; the bundle has {', '.join(sorted(subs)) or 'none'}")
        return subject

    def decode(self, voxels: np.ndarray, subject: str | None = None, name: str = "voxels") -> np.ndarray:
        """(N, V) or (V,) voxels -> (N, 16, 768) float32 ip tokens."""
        subject = self.subject(subject)
        x = validate_voxels(np.asarray(voxels), name, self.subjects[subject])
        comp = self.manifest.subjects[subject]
        sess = self.session(comp)
        feeds = {"voxels": x.astype(sess.input_dtype("voxels"))}
        out = sess.run(feeds)
        if self.observer:
            self.observer(comp, feeds, out)
        tokens = out["ip_tokens"].astype(np.float32)
        self.release(comp)
        return tokens

    # -- settings -----------------------------------------------------------------------------------
    @property
    def defaults(self) -> dict:
        """What a call that leaves a setting out gets: the bundle's run defaults over DEFAULTS (and the tiny VAE
        where the bundle has no full one)."""
        run = self.manifest.extra.get("run_defaults", {})
        d = {**DEFAULTS, **run}
        if "vae" not in run and VAES["full"] not in self.manifest.components:
            d["vae"] = "tiny"
        return d

    def settings(self, **given) -> dict:
        """`given` (None = not given) over the defaults."""
        return {**self.defaults, **{k: v for k, v in given.items() if v is not None}}

    def checked_settings(self, **given) -> dict:
        """settings(**given), each checked against this bundle, or InputError naming the bad one: steps its
        scheduler can take, finite guidance and ip scale, a VAE the bundle has. Nothing runs before this."""
        cfg = self.settings(**given)
        for name in ("guidance", "ip_scale"):
            cfg[name] = check_number(name.replace("_", " "), cfg[name])
        try:
            make_scheduler(cfg["scheduler"], self.manifest.scheduler_config, cfg["steps"])
        except ValueError as e:
            raise InputError(str(e)) from None
        cfg["steps"] = int(cfg["steps"])
        self.vae_component(cfg["vae"])
        return cfg

    def vae_component(self, vae: str) -> str:
        """The bundle's graph for `vae` (full | tiny), or InputError saying which the bundle has."""
        comp = VAES.get(vae)
        if comp not in self.manifest.components:
            have = [k for k, c in VAES.items() if c in self.manifest.components]
            raise InputError(f"vae {vae!r}: the bundle has {' and '.join(have) or 'no'} VAE decoder"
                             f"{'s' * (len(have) != 1)} (choose from {', '.join(have)})")
        return comp

    # -- generation ---------------------------------------------------------------------------------
    def initial_latents(self, n: int, seed: int) -> np.ndarray:
        """Unit-variance noise (n, 4, h, w); image i from numpy's PCG64 seeded with seed + i."""
        check_seed(seed, n)
        h, w = self.manifest.latent_size
        c = self.manifest.latent_channels
        return np.stack([np.random.default_rng(seed + i).standard_normal((c, h, w), dtype=np.float32)
                         for i in range(n)])

    def denoise(self, tokens: np.ndarray, *, steps: int | None = None, guidance: float | None = None,
                ip_scale: float | None = None, scheduler: str | None = None, seed: int = 0,
                latents: np.ndarray | None = None, callback: StepCallback | None = None) -> np.ndarray:
        """(N, 16, 768) tokens -> (N, 4, h, w) final latents (before the VAE scaling)."""
        cfg = self.checked_settings(steps=steps, guidance=guidance, ip_scale=ip_scale, scheduler=scheduler)
        steps, guidance, ip_scale, scheduler = cfg["steps"], cfg["guidance"], cfg["ip_scale"], cfg["scheduler"]
        tokens = finite_array(tokens, "tokens")
        if tokens.ndim == 2:
            tokens = tokens[None]
        if tokens.ndim != 3 or tokens.shape[1:] != self.uncond_tokens.shape[1:] or not len(tokens):
            raise InputError(f"tokens must have shape (N, {self.uncond_tokens.shape[1]}, "
                             f"{self.uncond_tokens.shape[2]}) with N >= 1, got {tokens.shape}")
        n = len(tokens)
        check_seed(seed, n)
        if latents is None:
            latents = self.initial_latents(n, seed)
        else:
            latents = finite_array(latents, "latents")
            want = (n, self.manifest.latent_channels, *self.manifest.latent_size)
            if latents.shape != want:
                raise InputError(f"latents must have shape {want}, got {latents.shape}")
        out = np.empty_like(latents)
        for i in range(n):
            out[i] = self._denoise_one(tokens[i:i + 1], latents[i:i + 1], steps, guidance, ip_scale, scheduler,
                                       seed + i, callback)
        self.release("unet")
        return out

    def _denoise_one(self, tokens, latent, steps, guidance, ip_scale, scheduler, seed, callback) -> np.ndarray:
        sched = make_scheduler(scheduler, self.manifest.scheduler_config, steps)     # checked in denoise
        unet = self.session("unet")
        dtype = unet.input_dtype("sample")
        cfg = guidance > 1.0                              # diffusers: guidance <= 1 means no CFG, batch 1
        if cfg:   # batch order as diffusers: [negative prompt + unconditional tokens, prompt + decoded tokens]
            text = np.concatenate([self.negative_embeds, self.prompt_embeds])
            ip = np.concatenate([self.uncond_tokens, tokens])
        else:
            text, ip = self.prompt_embeds, tokens
        split = cfg and self.split_guidance            # the two halves at batch 1, one after the other
        conds = [{"encoder_hidden_states": text[h].astype(dtype), "ip_tokens": ip[h].astype(dtype)}
                 for h in ([slice(0, 1), slice(1, 2)] if split else [slice(None)])]
        constants = {"ip_scale": np.array([ip_scale], dtype)}
        if not split:                                   # one call per step: its conditioning stays on the device
            constants.update(conds.pop())
            conds = [{}]
        x = latent * np.float32(sched.init_noise_sigma)                            # (1, 4, h, w)
        # fresh noise between steps: a stream of its own (spawn key 1), never another seed's initial latent
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))) if sched.stochastic else None
        with unet.bound(constants):                    # uploaded once; per step only the latent travels
            for i, t in enumerate(sched.timesteps):
                xin = sched.scale_model_input(x, i)
                if cfg and not split:
                    xin = np.concatenate([xin, xin])
                feeds = {"sample": xin.astype(dtype), "timestep": np.array([t], dtype)}
                eps = np.concatenate([self._unet(unet, constants, {**feeds, **c}) for c in conds])
                if cfg:
                    eps = eps[:1] + np.float32(guidance) * (eps[1:] - eps[:1])
                if rng is not None and i < len(sched.timesteps) - 1:
                    x = sched.step(eps, i, x, rng.standard_normal(x.shape, dtype=np.float32))
                else:
                    x = sched.step(eps, i, x)
                if callback:
                    callback(i + 1, len(sched.timesteps))
        return x[0]

    def _unet(self, unet: Backend, constants: dict, feeds: dict) -> np.ndarray:
        out = unet.run(feeds)
        if self.observer:
            self.observer("unet", {**constants, **feeds}, out)
        return out["noise_pred"].astype(np.float32)

    def decode_latents(self, latents: np.ndarray, vae: str | None = None) -> np.ndarray:
        """(N, 4, h, w) final latents -> (N, H, W, 3) uint8, one image at a time. `vae`: full | tiny (TAESD)."""
        vae = self.settings(vae=vae)["vae"]
        comp = self.vae_component(vae)
        # TAESD decodes UNet-space latents (its scaling factor is 1); the full VAE divides by 0.18215 first
        scaling = float(self.manifest.components[comp].extra.get("scaling_factor", self.manifest.vae_scaling_factor))
        latents = np.asarray(latents, np.float32)
        images = []
        for i in range(len(latents)):
            z = latents[i:i + 1] / np.float32(scaling)
            img = self._vae(z, comp)                                                 # (1, 3, H, W), about [-1, 1]
            if not np.isfinite(img).all():
                if comp != VAES["full"] or FP32_VAE not in self.manifest.components:
                    precision = self.manifest.components[comp].precision
                    raise NsdedgeError(f"image {i}: the {vae} VAE decoder ({precision}) produced NaN/Inf"
                                       + (" (fp16 overflow) and the bundle has no fp32 VAE to fall back on; use an "
                                          "fp32 bundle" if precision == "fp16" else ""))
                log.warning("fp16 VAE overflowed on image %d; decoding it again in fp32", i)
                img = self._vae(z, FP32_VAE)
            images.append(to_uint8(img)[0])
        self.release(comp)
        self.release(FP32_VAE)
        return np.stack(images)

    def _vae(self, z: np.ndarray, component: str) -> np.ndarray:
        vae = self.session(component)
        feeds = {"latent": z.astype(vae.input_dtype("latent"))}
        out = vae.run(feeds)
        if self.observer:
            self.observer(component, feeds, out)
        return out["image"].astype(np.float32)

    def generate(self, tokens: np.ndarray, *, steps: int | None = None, guidance: float | None = None,
                 ip_scale: float | None = None, scheduler: str | None = None, seed: int = 0,
                 latents: np.ndarray | None = None, vae: str | None = None,
                 callback: StepCallback | None = None) -> np.ndarray:
        """(N, 16, 768) tokens -> (N, H, W, 3) uint8 images. Settings left out: the bundle's run defaults."""
        self.vae_component(self.settings(vae=vae)["vae"])             # before the denoising, not after it
        final = self.denoise(tokens, steps=steps, guidance=guidance, ip_scale=ip_scale, scheduler=scheduler,
                             seed=seed, latents=latents, callback=callback)
        return self.decode_latents(final, vae=vae)

    def __call__(self, voxels: np.ndarray, subject: str | None = None, **kw) -> np.ndarray:
        return self.generate(self.decode(voxels, subject), **kw)


def check_number(name: str, value) -> float:
    """A finite real number (bool and strings refused), as float, or InputError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def finite_array(x, name: str) -> np.ndarray:
    """`x` as float32, or InputError if it is not real numbers (bool, complex, object) or holds NaN or Inf."""
    try:
        a = np.asarray(x)
    except ValueError as e:                                           # ragged nested lists
        raise InputError(f"{name}: not an array ({e})") from None
    if a.dtype.kind not in "fiu":
        raise InputError(f"{name} must be real numbers, got dtype {a.dtype}")
    with np.errstate(over="ignore"):
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError(f"{name} hold NaN or Inf (or values beyond float32)")
    return a


def check_seed(seed: int, n: int = 1) -> int:
    """Seeds seed .. seed + n - 1 are used: each must be a whole number in [0, 2**63)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be a whole number, got {seed!r}")
    if not 0 <= int(seed) <= SEED_LIMIT - max(int(n), 1):
        raise InputError(f"seed {seed} out of range: with {n} image(s) it must be in [0, {SEED_LIMIT - max(n, 1)}]")
    return int(seed)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounding as diffusers' numpy_to_pil does."""
    x = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (x * 255).round().astype(np.uint8)
