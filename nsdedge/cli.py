"""The `nsdedge` command. Heavy modules are imported inside the command that needs them.

The library raises NsdedgeError; here it becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import BundleError, InputError, NsdedgeError
from .runtime.schedulers import NAMES as SCHEDULERS
from .runtime.session import PROVIDER_NAMES

log = logging.getLogger("nsdedge")

DEFAULT_PRESET = "tiny"
RANDOM_WEIGHTS_NOTICE = (f"note: no --bundle, so the default bundle (preset {DEFAULT_PRESET}) runs: its weights are random "
                         f"and its images are noise; for real reconstructions see README.md, 'Real reconstructions'")


def _setup_logging(verbose: int) -> None:
    """The command's log lines on stderr: the `nsdedge` logger gets its own handler (nothing else is touched);
    -v shows info, -vv debug, on the group or on any command."""
    if not any(getattr(h, "_nsdedge", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._nsdedge = True
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.WARNING)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    log.setLevel(min(level, log.level))


def _quiet_onnxruntime() -> None:
    """onnxruntime's own log prints every provider library that fails to load (the probe of a GPU provider meets
    them on machines without one); the CLI says it in one line itself, so below -vv only fatal messages show.
    The CLI owns its process; the library never does this."""
    if log.level > logging.DEBUG:
        with contextlib.suppress(ImportError):
            import onnxruntime

            onnxruntime.set_default_logger_severity(4)


def _quiet_ray() -> None:
    """Ray Data prints each dataset's plan and notices on stderr; the CLI shows its own bar and summary, so below -v
    its console handler shows errors only (its log file under /tmp/ray keeps everything). The CLI owns its process;
    the library never does this."""
    try:
        import ray.data  # noqa: F401  (sets up the ray.data logger and its handlers)
    except ImportError:
        return                                      # run_job says what to install

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def _verbose(f):
    """-v / --verbose on a command too (`nsdedge run -v` as well as `nsdedge -v run`)."""
    return click.option("-v", "--verbose", count=True, expose_value=False, help="More log output (-v info, -vv debug).",
                        callback=lambda ctx, param, value: _setup_logging(value))(f)


class _Finite(click.FloatRange):
    """A number in a range, and finite: click's FloatRange lets NaN through (every comparison with it is false)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv is not None and not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


class _Group(click.Group):
    def add_command(self, cmd, name=None):
        super().add_command(_verbose(cmd), name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nsdedge")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """fMRI-to-image reconstruction: NSD voxels -> IP-Adapter-Plus tokens -> Stable Diffusion 1.5."""
    _setup_logging(verbose)


# -- export -----------------------------------------------------------------------------------------
def _parse_decoders(values: tuple[str, ...]) -> dict[str, Path]:
    from .bundle import check_subject

    out: dict[str, Path] = {}
    for v in values:
        subject, sep, path = v.partition("=")
        if not sep or not subject or not path:
            raise InputError(f"--decoder {v!r}: expected SUBJECT=FILE, e.g. subj01=decoder.safetensors")
        check_subject(subject)
        if subject in out:
            raise InputError(f"--decoder: subject {subject!r} given twice")
        out[subject] = Path(path)
    return out


def _local_weights(value: Path | None, kind: str, option: str, refs: dict) -> Path | None:
    """A weights option as a local path: a path on disk, or a Hugging Face hub id found in the local cache
    (never downloaded; what it resolved to goes into `refs`, which the manifest records)."""
    if value is None:
        return None
    from .hub import resolve

    path, ref = resolve(str(value), kind, option=option)
    if ref is not None:
        refs[option] = ref.record()
    return path


def _derive(fp32: Path, out: Path, **kw) -> None:
    """export --from-bundle: another precision / target converted from an fp32 bundle."""
    from .bundle import MANIFEST

    if not (fp32 / MANIFEST).is_file():
        raise InputError(f"--from-bundle {fp32}: not a bundle (no {MANIFEST})")
    t0 = time.perf_counter()
    try:
        from .export.build import derive_bundle
    except ImportError as e:
        raise NsdedgeError(f"export needs the export extra ({e.name} is missing): pip install 'nsdedge[export]'") from None
    m = derive_bundle(fp32, out, progress=lambda step: click.echo(f"[{time.perf_counter() - t0:7.1f}s] {step}",
                                                                  err=True), **kw)
    click.echo(_summary(out, m))


def _parse_run_defaults(text: str | None) -> dict | None:
    """--run-defaults "scheduler=lcm,steps=4,guidance=1,vae=tiny" -> checked settings."""
    from .runtime.batch import Settings

    if text is None:
        return None
    kinds = {"steps": int, "guidance": float, "ip_scale": float, "scheduler": str, "vae": str}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise InputError(f"--run-defaults {part!r}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
        try:
            out[key] = kinds[key](value.strip())
        except ValueError:
            raise InputError(f"--run-defaults {part!r}: {value.strip()!r} is not a {kinds[key].__name__}") from None
    Settings(**out).checked()
    return out


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "sd15-random", "tiny-lcm", "sd15-random-lcm"]),
              help="Random-weight models; no weights needed (-lcm: with a random LCM-LoRA fused and a TAESD).")
@click.option("--sd", "sd", type=click.Path(path_type=Path),
              help="SD 1.5: a diffusers folder, a single-file .safetensors / .ckpt checkpoint, or a hub id in the "
                   "local Hugging Face cache (stable-diffusion-v1-5/stable-diffusion-v1-5; ORG/NAME[@REV][:PATH]).")
@click.option("--sd-config", type=click.Path(path_type=Path),
              help="For a single-file --sd: a diffusers SD 1.5 folder giving its configs and tokenizer.")
@click.option("--ip-adapter", type=click.Path(path_type=Path),
              help="ip-adapter-plus_sd15 .bin or .safetensors (or h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors).")
@click.option("--image-encoder", type=click.Path(path_type=Path),
              help="CLIP ViT-H vision folder, transformers (or h94/IP-Adapter:models/image_encoder).")
@click.option("--decoder", "decoders", multiple=True, metavar="SUBJECT=FILE", help="A fitted decoder; repeatable.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "bf16"]), default="fp32", show_default=True,
              help="bf16: --target openvino only (computed in bf16 on CPUs with AVX512_BF16 or AMX).")
@click.option("--calibration-voxels", type=click.Path(path_type=Path),
              help="Real trials: the last 2 are held out for the fidelity report; with --target tensorrt --precision "
                   "int8 the others calibrate the activation scales.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="A recorded calibration file (`nsdedge calibrate`) for --target tensorrt --precision int8.")
@click.option("--int8-ops", type=click.Choice(["matmul+conv-weights", "matmul", "matmul+conv"]),
              default="matmul+conv-weights", show_default=True,
              help="What int8 covers in the UNet (onnx target): conv-weights stores conv weights int8 and computes "
                   "convs in fp32 (0.28x file, half the memory); matmul leaves conv weights fp32 (10% faster steps); "
                   "matmul+conv is dynamic int8 convs (slower on CPUs).")
@click.option("--int8-recipe", type=click.Choice(["auto", "weights", "full", "hybrid"]), default="auto",
              show_default=True,
              help="--target openvino --precision int8: weights = NNCF int8 weights, f32 compute, no calibration; "
                   "full = the UNet's activations too; hybrid = int8-weight MatMuls, the rest (convs, attention) "
                   "fully int8; full and hybrid calibrate from --calibration-voxels / --calibration. auto = full "
                   "where calibration data is given (it measured fastest), else weights.")
@click.option("--compute", type=click.Choice(["f32", "bf16"]), default=None,
              help="--target openvino --precision int8: what is not int8 (and the VAE, then fp16 weights) computes in "
                   "bf16 on CPUs with AVX512_BF16 or AMX; its fidelity is measured as it runs. Default: f32.")
@click.option("--target", type=click.Choice(["onnx", "tensorrt", "openvino", "cuda"]), default="onnx",
              show_default=True,
              help="tensorrt: int8 is static QDQ (explicit quantization) from calibration data. openvino: OpenVINO "
                   "IR (int8 through NNCF: --int8-recipe, --compute). cuda: fp16 / fp32 graphs with onnxruntime's "
                   "GPU fusions (GroupNorm, NHWC convolutions) that only --provider cuda runs; export it on the GPU.")
@click.option("--opset", type=click.IntRange(14, 18), default=18, show_default=True,
              help="ONNX opset of the UNet and VAE graphs: 17 for TensorRT 8.6, 16 for JetPack 5 / TensorRT 8.5.")
@click.option("--resolution", type=int, help="Image side in pixels (default: the model's, 512 for SD 1.5).")
@click.option("--prompt", default=None, help="Text encoded once at export (IP-Adapter's default).")
@click.option("--negative-prompt", default=None, help="Negative text encoded once at export.")
@click.option("--lora", type=click.Path(path_type=Path),
              help="A few-step LoRA (.safetensors: LCM-LoRA, Hyper-SD, TCD) fused into the UNet before export.")
@click.option("--lora-scale", type=float, default=1.0, show_default=True)
@click.option("--tiny-vae", type=click.Path(path_type=Path), help="A TAESD folder (diffusers AutoencoderTiny).")
@click.option("--no-full-vae", is_flag=True, help="Leave the full VAE decoder out (needs --tiny-vae).")
@click.option("--run-defaults", default=None, metavar="KEY=VALUE,...",
              help="Settings the bundle runs with unless told otherwise, e.g. scheduler=lcm,steps=4,guidance=1,vae=tiny "
                   "(--lora implies LCM-LoRA's: lcm, 4 steps, guidance 1, and the tiny VAE if there is one).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a preset's random weights.")
@click.option("--from-bundle", type=click.Path(path_type=Path),
              help="Convert this exported fp32 bundle to --precision / --target instead of exporting from weights "
                   "(no weights, no tracing; the same graphs export would convert).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
def export(preset, sd, sd_config, ip_adapter, image_encoder, decoders, precision, calibration_voxels, calibration,
           int8_ops, int8_recipe, compute, target, opset, resolution, prompt, negative_prompt, lora, lora_scale, tiny_vae,
           no_full_vae, run_defaults, seed, from_bundle, force, out):
    """Export decoders, the IP-token UNet and the VAE decoder to a verified ONNX bundle."""
    from .bundle import check_replaceable, check_writable

    if (out.exists() or out.is_symlink()) and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    check_replaceable(out)
    check_writable(out)
    if (precision == "bf16" and target != "openvino") or (precision == "fp16" and target == "openvino"):
        raise InputError(f"--precision {precision} with --target {target}: bf16 is for --target openvino, which "
                         f"takes fp32, bf16 or int8")
    if compute is not None:                        # the combination before what this CPU can compute
        from .export.build import check_options

        check_options(precision, target, int8_recipe=int8_recipe, calibration_voxels=calibration_voxels,
                      calibration=calibration, compute=compute)
    if target == "openvino":
        from .runtime.ov_session import check_precision, openvino

        openvino()                                 # one line with the install command when it is missing
        if precision == "bf16":
            check_precision("bf16")                # its fidelity is measured here: this CPU must compute bf16
        if precision == "int8":
            try:
                import nncf
            except ImportError:
                raise InputError("--target openvino --precision int8 needs nncf: "
                                 "pip install 'nsdedge[export]'") from None
            nncf.set_log_level(logging.ERROR)      # its tables and progress bars; the CLI shows its own progress
    if target == "cuda":                           # before loading weights: what the target takes, CUDA here
        from .export.cuda_graph import check_cuda_target

        check_cuda_target(precision)
    if precision == "int8" and target == "openvino" and int8_recipe not in ("weights", "auto") and \
            not (calibration_voxels or calibration):
        from .export.build import OPENVINO_CALIBRATION_NEEDED

        raise InputError(OPENVINO_CALIBRATION_NEEDED)
    if precision == "int8" and target == "tensorrt" and not (calibration_voxels or calibration):
        from .calibration.record import CALIBRATION_NEEDED

        raise InputError(CALIBRATION_NEEDED)
    if calibration is not None:
        if not calibration.is_file():
            raise InputError(f"{calibration}: no such calibration file")
        from .calibration.record import check_calibration

        check_calibration(calibration)
    if calibration_voxels is not None and not calibration_voxels.is_file():
        raise InputError(f"{calibration_voxels}: no such calibration voxel file")
    if from_bundle is not None:
        given = [name for name, v in (("--preset", preset), ("--sd", sd), ("--sd-config", sd_config),
                                      ("--ip-adapter", ip_adapter), ("--image-encoder", image_encoder),
                                      ("--decoder", decoders), ("--resolution", resolution), ("--prompt", prompt),
                                      ("--negative-prompt", negative_prompt), ("--lora", lora),
                                      ("--tiny-vae", tiny_vae), ("--no-full-vae", no_full_vae),
                                      ("--run-defaults", run_defaults), ("--opset", opset != 18),
                                      ("--lora-scale", lora_scale != 1.0)) if v]
        if given:
            raise InputError(f"--from-bundle converts a bundle as it is: {', '.join(given)} would need a new export")
        return _derive(from_bundle, out, precision=precision, target=target, force=force,
                       calibration_voxels=calibration_voxels, calibration=calibration, int8_ops=int8_ops,
                       int8_recipe=int8_recipe, compute=compute)
    if bool(preset) == bool(sd):
        raise InputError("give either --preset or --sd (with --ip-adapter and --image-encoder)")
    if sd and not (ip_adapter and image_encoder):
        raise InputError("--sd needs --ip-adapter and --image-encoder too")
    if resolution is not None:
        from .bundle import MAX_RESOLUTION

        if not 0 < resolution <= MAX_RESOLUTION:
            raise InputError(f"--resolution must be from 1 to {MAX_RESOLUTION} pixels, got {resolution}")
    hub_refs: dict[str, dict] = {}
    sd, sd_config, ip_adapter, image_encoder, lora, tiny_vae = (
        _local_weights(value, kind, option, hub_refs) for value, kind, option in (
            (sd, "sd", "--sd"), (sd_config, "sd_config", "--sd-config"), (ip_adapter, "ip_adapter", "--ip-adapter"),
            (image_encoder, "image_encoder", "--image-encoder"), (lora, "lora", "--lora"),
            (tiny_vae, "tiny_vae", "--tiny-vae")))
    decoder_files = _parse_decoders(decoders)
    defaults = _parse_run_defaults(run_defaults)
    if lora is not None and not (lora.is_file() and lora.suffix == ".safetensors"):
        raise InputError(f"--lora {lora}: not a .safetensors file")
    if tiny_vae is not None and not tiny_vae.is_dir():
        raise InputError(f"--tiny-vae {tiny_vae}: not a directory (an AutoencoderTiny folder, e.g. madebyollin/taesd)")
    few_step_preset = (preset or "").endswith("-lcm")          # brings its LoRA and TAESD
    if no_full_vae and tiny_vae is None and not few_step_preset:
        raise InputError("--no-full-vae needs --tiny-vae: a bundle needs a VAE decoder")
    if (defaults or {}).get("vae") == "tiny" and tiny_vae is None and not few_step_preset:
        raise InputError("run defaults name the tiny VAE but there is none: add --tiny-vae")
    if not math.isfinite(lora_scale):
        raise InputError(f"--lora-scale must be a finite number, got {lora_scale}")
    if lora_scale != 1.0 and lora is None and not few_step_preset:
        raise InputError("--lora-scale needs --lora (or a -lcm preset)")

    t0 = time.perf_counter()

    def progress(step: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {step}", err=True)

    # no progress line before the weights are loaded and export_bundle has checked its settings: bad input is one
    # line on stderr (the first line after them shows how long loading took)
    try:
        from .export.build import export_bundle
        from .export.decoder_export import read_any_decoder
        from .export.presets import build_preset
        from .export.sources import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, load_sources, quiet_libraries
    except ImportError as e:
        raise NsdedgeError(f"export needs the export extra ({e.name} is missing): pip install 'nsdedge[export]'") from None
    quiet_libraries()
    decs = [read_any_decoder(p) for p in decoder_files.values()]
    for (subject, _), dec in zip(decoder_files.items(), decs):
        dec.subject = subject
    if preset:
        src = build_preset(preset, seed=seed)
        src.decoders += decs
        src.provenance.update({f"decoder-{s}": str(p) for s, p in decoder_files.items()})
    else:
        if not decs:
            raise InputError("give at least one --decoder SUBJECT=FILE (fit one with `nsdedge fit`)")
        src = load_sources(sd, ip_adapter, image_encoder, decs, decoder_files, sd_config=sd_config)
    if lora is not None or tiny_vae is not None:
        from .export.few_step import LCM_RUN_DEFAULTS, load_tiny_vae, read_lora
        from .export.sources import file_digest, folder_digest

        if lora is not None:
            src.lora, src.lora_scale, src.lora_name = read_lora(lora), lora_scale, str(lora)
            src.provenance["lora"] = file_digest(lora)
            src.run_defaults = dict(LCM_RUN_DEFAULTS)
        if tiny_vae is not None:
            src.tiny_vae = load_tiny_vae(tiny_vae)
            src.provenance["tiny_vae"] = folder_digest(tiny_vae)
    if src.lora is None and lora_scale != 1.0:
        raise InputError("--lora-scale needs --lora (or a -lcm preset)")
    if src.lora is not None:
        src.lora_scale = lora_scale
        if src.tiny_vae is not None:
            src.run_defaults.setdefault("vae", "tiny")
    src.run_defaults.update(defaults or {})
    src.full_vae = not no_full_vae
    src.hub = hub_refs
    subjects = [d.subject for d in src.decoders]
    if len(set(subjects)) != len(subjects):
        raise InputError(f"two decoders for the same subject in {subjects}")
    m = export_bundle(src, out, precision=precision, resolution=resolution,
                      prompt=prompt if prompt is not None else DEFAULT_PROMPT,
                      negative_prompt=negative_prompt if negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
                      force=force, calibration_voxels=calibration_voxels, int8_ops=int8_ops, target=target,
                      calibration=calibration, opset=opset, progress=progress, int8_recipe=int8_recipe,
                      compute=compute)
    click.echo(_summary(out, m))
    if target == "tensorrt":
        click.echo(f"TensorRT engines are tied to the GPU and TensorRT version: on the target machine run\n"
                   f"  nsdedge build-engines {out}\nthen `nsdedge run --provider engine` (or --provider tensorrt to let "
                   f"onnxruntime build and cache them)")


# -- info -------------------------------------------------------------------------------------------
def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x, spec: str) -> str:
    """A number from a manifest: strict JSON writes NaN as null and infinity as "inf"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):      # undefined, e.g. no spread without guidance
        return "-"
    return x if isinstance(x, str) else format(x, spec)


def _summary(path: Path, m) -> str:
    lines = [f"bundle {path}  (nsdedge {m.nsdedge_version}, schema {m.schema_version}, {m.precision}, "
             f"target {m.extra.get('target', 'onnx')})",
             f"  image {m.image_size[0]}x{m.image_size[1]}, latent {m.latent_channels}x{m.latent_size[0]}x"
             f"{m.latent_size[1]} (VAE factor {m.vae_scale_factor}, scaling {m.vae_scaling_factor})",
             f"  prompt {m.prompt!r}; negative {m.negative_prompt!r}",
             f"  {'component':<22}{'precision':<10}{'size':>10}  {'parity (rel L2)*':<20}source"]
    for name, c in m.components.items():
        size = sum(m.files.get(f, {}).get("size", 0) for f in [c.file, *c.data_files])
        parity = " ".join(_num(v, ".1e") for v in c.parity.values()) or "-"
        source = re.sub(r"([0-9a-f]{12})[0-9a-f]{52}", r"\1..", c.source)    # full hashes are in the manifest
        lines.append(f"  {name:<22}{c.precision:<10}{_human(size):>10}  {parity:<20}{source}")
    total = sum(f.get("size", 0) for f in m.files.values())
    lines.append(f"  total {_human(total)} in {len(m.files)} files; subjects: "
                 + ", ".join(f"{s} ({m.components[c].extra.get('voxels')} voxels)" for s, c in m.subjects.items()))
    lines.append("  * against torch at export" + (f"; then {m.precision} against fp32" if m.precision != "fp32" else ""))
    hub = m.source.get("hub") if isinstance(m.source, dict) else None
    if isinstance(hub, dict) and hub:
        lines.append("  weights from the Hugging Face cache: " + "; ".join(
            f"{opt} {r.get('id')}@{str(r.get('commit'))[:12]}" + (f":{r['path']}" if r.get("path") else "")
            for opt, r in hub.items() if isinstance(r, dict)))
    if m.extra.get("target") == "openvino":
        from .runtime.ov_session import hint_for

        lines.append("  runs on OpenVINO (--provider openvino), computing in: " + ", ".join(
            f"{n} {hint_for(c.precision, c.extra.get('compute')) or '?'}" for n, c in m.components.items()))
    if m.extra.get("target") == "cuda":
        lines.append("  runs on onnxruntime's CUDA provider only (--target cuda: fused GroupNorm, NHWC convolutions)")
    if m.extra.get("run_defaults"):
        lora = m.extra.get("lora")
        lines.append("  runs with: " + ", ".join(f"{k} {v}" for k, v in m.extra["run_defaults"].items())
                     + (f"  (LoRA {lora['source'][:24]} fused at scale {lora['scale']})" if lora else ""))
    f = m.extra.get("fidelity")
    if f:
        lines.append(f"  fidelity of {f['precision']} against fp32 ({f['inputs']}, {f.get('scheduler', 'ddim')} "
                     f"{f['steps']} steps, guidance {f['guidance']}, {f.get('vae', 'full')} VAE):")
        if f.get("int8_scheme"):
            lines.append(f"    int8: {f['int8_scheme']} over {', '.join(f['int8_ops'])}"
                         + (f"; calibration calls {f['calibration_calls']}" if f.get("calibration_calls") else ""))
        lines.append("    component rel L2: "
                     + ", ".join(f"{k} {_num(v, '.2e')}" for k, v in f["component_rel_l2"].items()))
        lines.append("    image PSNR dB: " + ", ".join(_num(v, ".1f") for v in f["psnr_db"])
                     + "; SSIM: " + ", ".join(_num(v, ".4f") for v in f["ssim"]))
        lines.append(f"    cond-uncond spread ratio: {_num(f['cfg_spread_ratio'], '.3f')} "
                     f"({_num(f['cfg_spread'], '.4f')} vs {_num(f['cfg_spread_fp32'], '.4f')}; "
                     f"< 0.9 means conditioning is lost)")
    return "\n".join(lines)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the sha256 checks (sizes are still checked).")
def info(bundle, no_verify):
    """Print a bundle's components, precision, sizes, sources and parity errors."""
    from .bundle import read_manifest

    m = read_manifest(bundle, verify=not no_verify)
    try:
        text = _summary(bundle, m)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:   # a described field of another shape
        raise BundleError(f"{bundle}: manifest field of an unexpected form ({type(e).__name__}: {e})") from None
    click.echo(text)


# -- run --------------------------------------------------------------------------------------------
def default_bundle(notes: list[str] | None = None) -> Path:
    """The tiny preset, built on first use into the user cache directory (keyed by nsdedge version); where it was
    built now, a line saying so is added to `notes` (shown once the run's input is checked: bad input stays one
    line)."""
    from platformdirs import user_cache_dir

    from .bundle import MANIFEST

    path = Path(user_cache_dir("nsdedge")) / "bundles" / f"{DEFAULT_PRESET}-{__version__}"
    if (path / MANIFEST).is_file():
        return path
    t0 = time.perf_counter()
    try:
        from .export.build import export_bundle
        from .export.presets import build_preset
        from .export.sources import quiet_libraries
    except ImportError as e:
        raise NsdedgeError(f"the default bundle is built on first use and needs the export extra ({e.name} is "
                           f"missing): pip install 'nsdedge[export]', or pass --bundle") from None
    quiet_libraries()
    export_bundle(build_preset(DEFAULT_PRESET), path, force=True)
    if notes is not None:
        notes.append(f"built the default bundle (preset {DEFAULT_PRESET}) in {path} "
                     f"({time.perf_counter() - t0:.0f} s, once)")
    return path


@cli.command()
@click.option("--voxels", type=click.Path(path_type=Path), help="(V,) or (N, V) .npy / .npz.")
@click.option("--bundle", type=click.Path(path_type=Path), help="Bundle directory (default: the tiny preset).")
@click.option("--subject", help="Subject whose decoder to use (needed when the bundle has several).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Denoising steps [default: the bundle's, else 20].")
@click.option("--guidance", type=float, help="Classifier-free guidance; 1 = off [default: the bundle's, else 7.5].")
@click.option("--ip-scale", type=float, help="Weight of the ip tokens [default: the bundle's, else 1.0].")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), help="[default: the bundle's, else ddim]")
@click.option("--vae", type=click.Choice(["full", "tiny"]), help="Decoder: full, or tiny (TAESD) [default: the bundle's].")
@click.option("--seed", type=int, default=None, help="Trial i uses seed + i [default: 0].")
@click.option("--provider", type=click.Choice(PROVIDER_NAMES), default="auto", show_default=True)
@click.option("--low-memory", is_flag=True,
              help="Load one graph at a time; a batch runs stage by stage (UNet loops, then VAE decodes).")
@click.option("--no-verify", is_flag=True, help="Skip the bundle's sha256 checks (sizes are still checked).")
@click.option("--trials", default=None, metavar="START:STOP",
              help="Only these rows of the voxel file (e.g. 0:10); images keep their row numbers.")
@click.option("--out", type=click.Path(path_type=Path),
              help="A .png (one trial) or a directory (0000.png, ...) [default: reconstructions]; with --job, each "
                   "work item names its own.")
@click.option("--job", "job_file", type=click.Path(path_type=Path),
              help="A job file (JSON): several voxel files / subjects / trial ranges, one output directory each.")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: the trials on a Ray cluster (Ray Data actors), the same bytes as local.")
@click.option("--ray-address", help="A running Ray cluster (default: RAY_ADDRESS, else a local Ray started for the job).")
@click.option("--actors", type=click.IntRange(1, 4096), default=1, show_default=True, help="Ray actors (workers).")
@click.option("--gpus-per-actor", type=_Finite(0, 64), default=0.0, show_default=True,
              help="GPUs each actor reserves (0.5: two actors share a GPU).")
@click.option("--cpus-per-actor", type=_Finite(0.01, 1024), default=None,
              help="CPUs each actor reserves, and its inference threads [default: 1].")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Inference threads (per Ray actor) [default: all cores; Ray: the actor's CPUs]. CPU images of the "
                   "same trial are byte-identical for equal thread counts.")
def run(voxels, bundle, subject, steps, guidance, ip_scale, scheduler, vae, seed, provider, low_memory, no_verify,
        trials, out, job_file, backend, ray_address, actors, gpus_per_actor, cpus_per_actor, threads):
    """Reconstruct images from a voxel file (or a job of several) in this process or on Ray."""
    from .runtime import Reconstructor
    from .runtime.batch import Settings, check_job, parse_trials, read_trials, reconstruct

    if (voxels is None) == (job_file is None):
        raise InputError("give --voxels FILE or --job JOB.json")
    ray_opts = backend == "ray" or ray_address or actors != 1 or gpus_per_actor or cpus_per_actor is not None
    if job_file is not None or ray_opts:
        if backend != "ray" and ray_opts:
            raise InputError("--ray-address, --actors, --gpus-per-actor and --cpus-per-actor need --backend ray")
        if low_memory or no_verify:
            raise InputError("--low-memory and --no-verify are for a local run of one voxel file (not --job or Ray)")
        return _run_job(voxels, job_file, bundle, subject, trials, out, provider, backend,
                        {"steps": steps, "guidance": guidance, "ip_scale": ip_scale, "scheduler": scheduler,
                         "vae": vae, "seed": seed, "threads": threads},
                        dict(actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                             ray_address=ray_address))
    seed = 0 if seed is None else seed
    out = Path("reconstructions") if out is None else out

    # everything is checked before the bundle is hashed (or the default one built) and before anything is written
    tr = read_trials(voxels, parse_trials(trials, "--trials"))
    given = {"steps": steps, "guidance": guidance, "ip_scale": ip_scale, "scheduler": scheduler, "vae": vae}
    check_job(tr, out, Settings(seed=seed, **given))
    _quiet_onnxruntime()
    if provider != "auto":                   # a named provider that cannot start: said before any bundle work
        from .runtime.session import resolve

        resolve(provider)
    notes = [RANDOM_WEIGHTS_NOTICE] if bundle is None else []      # said once the input is checked (below)
    rec = Reconstructor(bundle or default_bundle(notes), provider=provider, low_memory=low_memory,
                        verify=not no_verify, threads=threads)
    run_defaults = {k: v for k, v in rec.manifest.extra.get("run_defaults", {}).items() if given.get(k) is None}
    if run_defaults:
        notes.append("the bundle's run settings: " + ", ".join(f"{k} {v}" for k, v in run_defaults.items()))
    with contextlib.ExitStack() as stack:
        bar, at = None, 0

        def progress(p) -> None:            # a bar over all steps of the images this run makes
            nonlocal bar, at
            if bar is None:                 # the first call comes after every check: bad input stays one line
                for note in notes:
                    click.echo(note, err=True)
                if p.skipped:
                    click.echo(f"{p.skipped} of {p.skipped + p.todo} images already in {out}; skipping them", err=True)
                bar = stack.enter_context(click.progressbar(length=max(p.todo * p.steps, 1), file=sys.stderr,
                                                            label=f"{p.todo} trial(s) x {p.steps} steps"))
            pos = max(p.done, p.denoised) * p.steps + p.step    # low memory denoises a chunk before writing it
            bar.update(pos - at)
            at = pos

        result = reconstruct(rec, tr, out, subject=subject, seed=seed, progress=progress, **given)
    click.echo(f"wrote {len(result.written)} image(s) to {out} (provider {result.provider})")


def _run_job(voxels, job_file, bundle, subject, trials, out, provider, backend, given: dict, ray: dict) -> None:
    """`run --job` or `run --backend ray`: a job through nsdedge.jobs, a bar over its trials, a summary."""
    from dataclasses import replace

    from .jobs import Job, Work, read_job, run_job

    if job_file is not None:
        if subject or trials or out:
            raise InputError("--subject, --trials and --out belong to each work item of the job file")
        job = read_job(job_file)
        job = replace(job, **{k: v for k, v in given.items() if v is not None})
        if provider != "auto":
            job.provider = provider
        job.bundle = bundle or job.bundle
    else:
        job = Job(bundle, [Work(voxels, subject, out or Path("reconstructions"), trials)], provider=provider,
                  **{k: v for k, v in given.items() if v is not None})
    notes: list[str] = []                           # said once the job is checked (its first progress call)
    if backend == "local" and job.provider != "auto":     # (on Ray the workers' machines decide)
        from .runtime.session import resolve

        resolve(job.provider)
    if job.bundle is None:
        from .jobs import check_inputs

        check_inputs(job)                           # before the default bundle is built: nothing made for nothing
        notes.append(RANDOM_WEIGHTS_NOTICE)
        job.bundle = default_bundle(notes)
    _quiet_onnxruntime()
    if backend == "ray" and log.level > logging.INFO:
        _quiet_ray()
    with contextlib.ExitStack() as stack:
        bar, at = None, 0

        def progress(done: int, todo: int) -> None:
            nonlocal bar, at
            if bar is None:
                for note in notes:
                    click.echo(note, err=True)
                bar = stack.enter_context(click.progressbar(length=max(todo, 1), file=sys.stderr,
                                                            label=f"{todo} trial(s) on {backend}"))
            bar.update(done - at)
            at = done

        r = run_job(job, backend, progress=progress, **ray)
    where = ", ".join(str(o) for o in r.outputs[:4]) + (f" and {len(r.outputs) - 4} more" if len(r.outputs) > 4 else "")
    click.echo(f"wrote {r.written} image(s), skipped {r.skipped} already there, {len(r.failed)} failed; "
               f"{r.seconds:.1f} s ({r.images_per_second:.2f} images/s{', provider ' + r.provider if r.provider else ''})"
               f"; outputs in {where}")
    if r.failed:
        out_dir, row, why = r.failed[0]
        raise NsdedgeError(f"{len(r.failed)} image(s) failed (first: {out_dir} row {row}: {why}); finished images "
                           f"are kept: run the job again to retry the rest")


# -- bench ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(1, 1000), help="End-to-end steps [default: the bundle's, else 20].")
@click.option("--guidance", type=float, help="[default: the bundle's, else 7.5]")
@click.option("--runs", type=click.IntRange(1, 1000), default=5, show_default=True, help="Timed runs per stage.")
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True, help="Untimed runs first.")
@click.option("--e2e-runs", type=click.IntRange(1, 100),
              help="Trials reconstructed one at a time, sessions warm [default: 5 for a bundle with run defaults, else 1].")
@click.option("--provider", type=click.Choice(PROVIDER_NAMES), default="auto", show_default=True)
@click.option("--low-memory", is_flag=True, help="Load one graph at a time.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results here too.")
def bench(bundle, steps, guidance, runs, warmup, e2e_runs, provider, low_memory, json_out):
    """Latency per stage (median, p90, min), load time, peak RSS and sizes of a bundle."""
    from .bench import bench_bundle, format_table
    from .bundle import atomic_write_bytes, check_new_file, is_nsdedge_json, json_text

    if json_out:
        check_new_file(json_out, inputs=[bundle], ours=is_nsdedge_json, flag="--json")
    _quiet_onnxruntime()
    t0 = time.perf_counter()
    r = bench_bundle(bundle, steps=steps, guidance=guidance, runs=runs, warmup=warmup, e2e_runs=e2e_runs,
                     provider=provider, low_memory=low_memory,
                     progress=lambda s: click.echo(f"[{time.perf_counter() - t0:7.1f}s] {s}", err=True))
    r["command"], r["nsdedge_version"] = " ".join(sys.argv), __version__
    click.echo(format_table(r))
    if json_out:
        atomic_write_bytes(json_out, json_text(r).encode())


# -- calibrate ----------------------------------------------------------------------------------------
@cli.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="An fp32 bundle.")
@click.option("--voxels", type=click.Path(path_type=Path), required=True, help="Real trials (N, V).")
@click.option("--subject", help="Subject whose decoder to use.")
@click.option("--steps", type=click.IntRange(1, 1000), help="[default: the bundle's, else 20]")
@click.option("--guidance", type=float, help="[default: the bundle's, else 7.5]")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), help="[default: the bundle's, else ddim]")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Calibration file (.npz).")
def calibrate(bundle, voxels, subject, steps, guidance, scheduler, out):
    """Record what every graph sees while the fp32 pipeline reconstructs real trials (an .npz)."""
    import numpy as np

    from .bundle import check_new_file
    from .calibration import record_calibration
    from .calibration.record import CALLS, is_calibration_file
    from .runtime import Reconstructor
    from .voxels import load_voxels

    check_new_file(out, inputs=[bundle, voxels], ours=is_calibration_file)
    rec = Reconstructor(bundle, provider="cpu")
    if rec.manifest.extra.get("target") == "openvino":
        raise InputError(f"{bundle}: calibration records an fp32 ONNX bundle (--target onnx or tensorrt); its file "
                         f"serves `export --target openvino --int8-recipe full --calibration` too")
    if rec.manifest.precision != "fp32":
        raise InputError(f"{bundle}: calibration needs an fp32 bundle, this one is {rec.manifest.precision}")
    subject = rec.subject(subject)
    x = load_voxels(voxels, expected_voxels=rec.subjects[subject])
    recorder = record_calibration(rec, x, subject, steps=steps, guidance=guidance, scheduler=scheduler)
    recorder.save(out)
    shapes = ", ".join(f"{c}/{n} {(len(v), *np.shape(v[0]))}" for c, d in recorder.by_component().items()
                       for n, v in d.items() if not n.endswith(CALLS))
    click.echo(f"wrote {out}: {shapes}")


# -- fit ------------------------------------------------------------------------------------------------
def _load_embeddings(path: Path):
    """Targets (N, 16, 768) from a .npy (memory-mapped) or one-array .npz; never unpickled."""
    from .voxels import read_array

    arr = read_array(path, what="embeddings")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"{path}: embeddings must be a numeric array, got dtype {arr.dtype}")
    return arr


@cli.command()
@click.option("--voxels", type=click.Path(path_type=Path), required=True, help="Training voxels (N, V) .npy.")
@click.option("--embeddings", type=click.Path(path_type=Path), required=True, help="Targets (N, 16, 768) .npy.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Decoder file (.safetensors).")
@click.option("--subject", default="subj01", show_default=True)
@click.option("--alphas", default=None, help="Comma-separated ridge penalties to choose from per token.")
@click.option("--rank", type=int, default=None, help="Reduced rank R (smaller decoder).")
@click.option("--no-rescale", is_flag=True, help="Do not store Brain-Diffuser's output rescaling.")
@click.option("--kind", type=click.Choice(["ridge", "mlp"]), default="ridge", show_default=True,
              help="mlp: the BrainGuard-style MLP, trained with torch (options below).")
@click.option("--hidden", type=click.IntRange(1, 65536), default=2048, show_default=True, help="mlp: width h.")
@click.option("--blocks", type=click.IntRange(0, 64), default=4, show_default=True, help="mlp: residual blocks.")
@click.option("--projector-hidden", type=click.IntRange(1, 65536), help="mlp: the token projector's width [default: h].")
@click.option("--epochs", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--batch-size", type=click.IntRange(2, 65536), default=32, show_default=True)
@click.option("--lr", type=_Finite(0, 10, min_open=True), default=3e-4, show_default=True,
              help="mlp: AdamW's peak learning rate (one-cycle schedule).")
@click.option("--val-fraction", type=_Finite(0, 0.9), default=0.1, show_default=True,
              help="mlp: trials held out for validation and early stopping.")
@click.option("--patience", type=click.IntRange(1, 100000), default=5, show_default=True,
              help="mlp: epochs without a better validation loss before stopping.")
@click.option("--seed", type=int, default=0, show_default=True, help="mlp: initialisation, split and shuffling.")
@click.option("--device", default="auto", show_default=True, help="mlp: auto, cpu or cuda[:N].")
def fit(voxels, embeddings, out, subject, alphas, rank, no_rescale, kind, hidden, blocks, projector_hidden, epochs,
        batch_size, lr, val_fraction, patience, seed, device):
    """Fit a decoder from voxels to IP-Adapter-Plus tokens: ridge (an alpha per token by leave-one-out) or the MLP."""
    import numpy as np

    from .bundle import check_new_file, check_subject
    from .decoders.linear import is_decoder_file
    from .voxels import load_voxels

    check_subject(subject)
    check_new_file(out, inputs=[voxels, embeddings], ours=is_decoder_file)
    if kind == "mlp" and (alphas or rank or no_rescale):
        raise InputError("--alphas, --rank and --no-rescale are ridge options; --kind mlp takes --hidden, --blocks, "
                         "--epochs, ...")
    if kind == "mlp" and out.suffix != ".safetensors":
        raise InputError(f"--out {out}: an MLP decoder is written as .safetensors")
    x = load_voxels(voxels)
    y = _load_embeddings(embeddings)
    if y.shape[0] != x.shape[0] or y.shape[1:] not in ((16, 768), (16 * 768,)):
        raise InputError(f"{embeddings}: shape {y.shape}, expected ({x.shape[0]}, 16, 768) to match {voxels}")
    y = np.asarray(y, np.float32)
    if not np.isfinite(y).all():
        raise InputError(f"{embeddings}: contains NaN or Inf")
    if kind == "mlp":
        return _fit_mlp(x, y, out, subject, dict(hidden=hidden, blocks=blocks,
                                                 projector_hidden=projector_hidden or hidden),
                        dict(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                             patience=patience, seed=seed, device=device))
    from .decoders.ridge import DEFAULT_ALPHAS, fit_ridge
    try:
        grid = [float(a) for a in alphas.split(",")] if alphas else list(DEFAULT_ALPHAS)
    except ValueError:
        raise InputError(f"--alphas {alphas!r}: expected comma-separated numbers") from None
    t0 = time.perf_counter()
    dec, report = fit_ridge(x, y, subject=subject, alphas=grid, rank=rank, rescale=not no_rescale,
                            progress=lambda s: click.echo(f"[{time.perf_counter() - t0:7.1f}s] {s}", err=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    dec.save(out)
    click.echo(f"wrote {out}: {subject}, {dec.voxels} voxels, rank {dec.rank or 'full'}, "
               f"alphas per token {report.alphas}, {report.seconds:.1f} s")


def _fit_mlp(x, y, out: Path, subject: str, arch: dict, train: dict) -> None:
    """fit --kind mlp: train, write atomically, report the held-out numbers."""
    try:
        import torch  # noqa: F401

        from .decoders.mlp import MLPConfig
        from .decoders.train import resolve_device, split, train_mlp
    except ImportError as e:
        raise NsdedgeError(f"--kind mlp trains with torch ({e.name} is missing): pip install 'nsdedge[train]'") from None
    from .bundle import atomic_writer

    resolve_device(train["device"])                 # a bad --device or too few trials before anything runs
    split(len(x), train["val_fraction"], train["seed"])
    cfg = MLPConfig(voxels=x.shape[1], **arch)
    with click.progressbar(length=train["epochs"], label=f"mlp h={cfg.hidden} x {cfg.blocks} blocks",
                           file=sys.stderr, item_show_func=lambda s: s) as bar:
        def progress(epoch: int, loss: float, val: float) -> None:
            bar.update(1, f"epoch {epoch} loss {loss:.4f} val {val:.4f}")
        model, report = train_mlp(x, y, cfg, progress=progress, **train)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out) as f:
        from safetensors.torch import save as save_bytes

        f.write(save_bytes({k: v.contiguous() for k, v in model.state_dict().items()}, metadata=model.metadata(subject)))
    click.echo(f"wrote {out}: {subject}, mlp {cfg.voxels} voxels -> h {cfg.hidden} x {cfg.blocks} blocks, best epoch "
               f"{report.best_epoch} of {report.epochs}, validation loss {min(report.val_loss):.4f}, token corr "
               f"{report.val_token_corr:.3f}, 2-way {report.val_two_way:.3f}, {report.seconds:.1f} s")


@cli.command("fit-federated")
@click.option("--subject", "subjects", multiple=True, required=True, metavar="S=X.npy:Y.npy",
              help="A subject (client): its voxels (N, V) and tokens (N, 16, 768); repeat for each.")
@click.option("--rounds", type=click.IntRange(1, 100000), default=20, show_default=True)
@click.option("--local-steps", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="Minibatch steps each client trains per round.")
@click.option("--adaptive-layers", type=click.IntRange(0, 1000), default=2, show_default=True,
              help="m: the last m shared layers are blended with the global ones by adaptive local aggregation.")
@click.option("--hidden", type=click.IntRange(1, 65536), default=2048, show_default=True)
@click.option("--blocks", type=click.IntRange(0, 64), default=4, show_default=True)
@click.option("--projector-hidden", type=click.IntRange(1, 65536), help="[default: --hidden]")
@click.option("--batch-size", type=click.IntRange(2, 65536), default=32, show_default=True)
@click.option("--lr", type=_Finite(0, 10, min_open=True), default=3e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cpus-per-client", type=_Finite(0.01, 1024), default=1.0, show_default=True,
              help="CPUs each simulated client reserves on the local Ray.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory: SUBJECT.safetensors per subject and federated.json.")
def fit_federated(subjects, rounds, local_steps, adaptive_layers, hidden, blocks, projector_hidden, batch_size, lr,
                  seed, cpus_per_client, out):
    """Train the MLP decoder across subjects with Flower (simulated here, one client per subject): shared layers
    averaged, each subject's input layer kept on its client."""
    import numpy as np

    from .bundle import check_subject, check_writable
    from .voxels import scan_voxels

    spec = []
    for v in subjects:
        name, sep, files = v.partition("=")
        x, sep2, y = files.partition(":")
        if not sep or not sep2 or not name or not x or not y:
            raise InputError(f"--subject {v!r}: expected SUBJECT=VOXELS.npy:EMBEDDINGS.npy")
        check_subject(name)
        rows, _ = scan_voxels(Path(x))
        emb = _load_embeddings(Path(y))
        if emb.shape[0] != len(rows) or emb.shape[1:] not in ((16, 768), (16 * 768,)):
            raise InputError(f"{y}: shape {emb.shape}, expected ({len(rows)}, 16, 768) to match {x}")
        if len(rows) < 4:
            raise InputError(f"{x}: {len(rows)} trials; a client needs at least 4 (2 held out for validation)")
        if not all(np.isfinite(emb[i:i + 256]).all() for i in range(0, len(emb), 256)):
            raise InputError(f"{y}: contains NaN or Inf")
        spec.append((name, x, y))
    names = [s[0] for s in spec]
    if len(set(names)) != len(names):
        raise InputError(f"--subject: a subject given twice in {names}")
    if len(spec) < 2:
        raise InputError("federated training needs at least two --subject; for one, use `nsdedge fit --kind mlp`")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    taken = [p for p in [*(out / f"{n}.safetensors" for n in names), out / "federated.json"] if p.exists()]
    if taken:
        raise InputError(f"{out} already holds {taken[0].name}; choose another --out")
    check_writable(out / "federated.json")
    try:
        import torch  # noqa: F401

        from .decoders.federated import FedSettings
        from .decoders.flower_apps import run_simulation
    except ImportError as e:
        raise NsdedgeError(f"fit-federated needs Flower and torch ({e.name} is missing): "
                           f"pip install 'nsdedge[federated]'") from None
    settings = FedSettings(hidden=hidden, blocks=blocks, projector_hidden=projector_hidden or hidden,
                           local_steps=local_steps, adaptive_layers=adaptive_layers, batch_size=batch_size, lr=lr,
                           seed=seed)
    if log.level > logging.INFO:
        logging.getLogger("flwr").setLevel(logging.WARNING)      # the CLI owns its process: Flower's INFO lines
    click.echo(f"Flower simulation: {len(spec)} clients ({', '.join(names)}), {rounds} rounds of {local_steps} "
               f"local step(s), {adaptive_layers} adaptive layer(s)", err=True)
    t0 = time.perf_counter()
    report = run_simulation(spec, settings, rounds, out, cpus_per_client=cpus_per_client)
    seconds = time.perf_counter() - t0
    last = report["evaluate"][str(rounds)]
    for i, name in enumerate(names):
        click.echo(f"wrote {out / (name + '.safetensors')}: held-out token corr {last[f'token_corr-{i}']:.3f}, "
                   f"2-way {last[f'two_way-{i}']:.3f}")
    click.echo(f"{rounds} rounds in {seconds:.1f} s ({seconds / rounds:.2f} s per round, Ray and Flower's start "
               f"included); report in {out / 'federated.json'}")


# -- build-engines --------------------------------------------------------------------------------------
@cli.command("build-engines")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--cache", type=click.Path(path_type=Path), help="Engine cache (default: BUNDLE/engines).")
@click.option("--batch", "batches", default="1,2", show_default=True,
              help="Batch sizes, one static profile each (2 = guidance, 1 = no guidance).")
@click.option("--dynamic", is_flag=True, help="One dynamic profile instead (batch and 0.5x-1.5x resolution; ~13% slower).")
@click.option("--workspace-gb", type=_Finite(0, 1024, min_open=True), default=4.0, show_default=True,
              help="Builder workspace cap (edge: 1-2).")
@click.option("--force", is_flag=True, help="Rebuild even when an up-to-date engine is cached.")
@click.option("--strongly-typed", is_flag=True,
              help="TensorRT 10: precision from the graph's own types, no fp16/int8 flags (TensorRT 11 always is).")
def build_engines_cmd(bundle, cache, batches, dynamic, workspace_gb, force, strongly_typed):
    """Build TensorRT engines for this GPU from a bundle's UNet and VAE graphs (cached, keyed by GPU and version)."""
    from .bundle import read_manifest
    from .engines import build_engines

    try:
        sizes = tuple(sorted({int(b) for b in batches.split(",")}))
    except ValueError:
        raise InputError(f"--batch {batches!r}: expected comma-separated integers, e.g. 1,2") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch {batches!r}: batch sizes must be >= 1")
    m = read_manifest(bundle)
    t0 = time.perf_counter()
    plans = build_engines(bundle, m, cache, sizes, dynamic, int(workspace_gb * (1 << 30)), force,
                          progress=lambda s: click.echo(f"[{time.perf_counter() - t0:7.1f}s] {s}", err=True),
                          strongly_typed=strongly_typed)
    for comp, plan in plans.items():
        click.echo(f"{comp}: {plan}")


def _done_counter(bar):
    """progress(done, total) callbacks of the library, which report totals so far, driving a click bar."""
    last = [0]

    def progress(done, total):
        bar.update(done - last[0])
        last[0] = done
    return progress


# -- embed ----------------------------------------------------------------------------------------------
@cli.command()
@click.option("--stimuli", type=click.Path(path_type=Path), required=True,
              help="Images: an (N, H, W, 3) .npy (NSD's stimuli, memory-mapped) or a directory.")
@click.option("--ip-adapter", type=click.Path(path_type=Path), required=True,
              help="ip-adapter-plus_sd15 .bin or .safetensors (its Resampler makes the tokens), or a hub id.")
@click.option("--image-encoder", type=click.Path(path_type=Path), required=True,
              help="CLIP ViT-H vision folder, or a hub id (h94/IP-Adapter:models/image_encoder).")
@click.option("--batch", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Tokens (N, 16, 768) .npy.")
def embed(stimuli, ip_adapter, image_encoder, batch, out):
    """IP-Adapter-Plus tokens of the stimuli: the targets of `nsdedge fit`."""
    from .bundle import check_new_file
    from .eval.images import ImageSet

    check_new_file(out, inputs=[stimuli, ip_adapter, image_encoder], ours=_is_token_file)
    images = ImageSet(stimuli)
    ip_adapter = _local_weights(ip_adapter, "ip_adapter", "--ip-adapter", {})
    image_encoder = _local_weights(image_encoder, "image_encoder", "--image-encoder", {})
    try:
        from .export.embed import embed_images
        from .export.ip_adapter import read_ip_adapter
        from .export.sources import load_image_encoder, quiet_libraries
    except ImportError as e:
        raise NsdedgeError(f"embed needs the export extra ({e.name} is missing): pip install 'nsdedge[export]'") from None
    quiet_libraries()
    ip = read_ip_adapter(ip_adapter)
    enc = load_image_encoder(image_encoder)
    if enc.config.hidden_size != ip.resampler.embedding_dim:
        raise InputError(f"{image_encoder}: CLIP hidden size {enc.config.hidden_size} does not match the "
                         f"Resampler's input ({ip.resampler.embedding_dim}) in {ip_adapter}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with click.progressbar(length=len(images), label=f"{len(images)} images", file=sys.stderr) as bar:
        progress = _done_counter(bar)
        embed_images(images, ip, enc, out, batch=batch, progress=progress)
    click.echo(f"wrote {out}: ({len(images)}, {ip.num_tokens}, {ip.resampler.output_dim}) tokens from {stimuli}")


def _is_token_file(path: Path) -> bool:
    """An .npy of ip tokens (N, 16, 768), as `embed` writes (plain numpy: no mark of its own)."""
    from .voxels import read_array

    try:
        arr = read_array(path, what="tokens")
    except InputError:
        return False
    return path.suffix == ".npy" and arr.ndim == 3 and arr.shape[1:] == (16, 768) and arr.dtype.kind == "f"


# -- doctor ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
def doctor(as_json):
    """What this machine can run: versions, providers that start, GPUs, disk, hub weights in the cache."""
    from .bundle import json_text
    from .doctor import format_report, report

    _quiet_onnxruntime()
    r = report()
    click.echo(json_text(r) if as_json else format_report(r))


# -- eval -----------------------------------------------------------------------------------------------
@cli.command("eval")
@click.option("--recons", type=click.Path(path_type=Path), required=True,
              help="Reconstructions: a directory of PNGs (as `nsdedge run` writes) or an (N, H, W, 3) .npy.")
@click.option("--stimuli", type=click.Path(path_type=Path),
              help="The seen images: an (N, H, W, 3) .npy (NSD's 425 x 425 uint8, memory-mapped) or a directory.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Fidelity mode: another bundle's output to compare against instead of the stimuli.")
@click.option("--preset", type=click.Choice(["mindeye", "braindiffuser"]), default="mindeye", show_default=True,
              help="Image sizes of the published tables.")
@click.option("--weights-dir", type=click.Path(path_type=Path),
              help="Local weights of the feature networks (torchvision file names; clip-vit-large-patch14/).")
@click.option("--pixel-only", is_flag=True, help="Only PixCorr and SSIM (no torch needed).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results here too.")
@click.option("--sheet", type=click.Path(path_type=Path), help="Write a contact sheet PNG (reference above recons).")
@click.option("--sheet-count", type=click.IntRange(1, 1000), default=16, show_default=True)
def eval_(recons, stimuli, reference, preset, weights_dir, pixel_only, json_out, sheet, sheet_count):
    """PixCorr, SSIM and the six feature metrics of reconstructions against stimuli (or another bundle's output)."""
    from .bundle import atomic_write_bytes, check_new_file, is_nsdedge_json, json_text
    from .eval.images import ImageSet, contact_sheet, pair_keys
    from .eval.metrics import METRICS, evaluate, format_metrics, missing_weights
    from .runtime.batch import is_nsdedge_png, png_bytes

    if (stimuli is None) == (reference is None):
        raise InputError("give exactly one of --stimuli (the seen images) or --reference (fidelity mode)")
    inputs = [recons, stimuli, reference, weights_dir]
    if json_out and sheet and json_out.absolute() == sheet.absolute():
        raise InputError(f"--json and --sheet name the same file ({json_out})")
    if json_out:                          # (a report may sit among the images: only the input files count)
        check_new_file(json_out, inputs=[p for p in inputs if p and p.is_file()], ours=is_nsdedge_json,
                       flag="--json")
    if sheet:
        check_new_file(sheet, inputs=inputs, ours=is_nsdedge_png, flag="--sheet")
    try:
        import scipy  # noqa: F401  (SSIM's Gaussian window)
    except ImportError:
        raise NsdedgeError("eval needs scipy: pip install 'nsdedge[eval]'") from None
    if weights_dir is not None and not weights_dir.is_dir():
        raise InputError(f"{weights_dir}: no such directory (--weights-dir)")
    rset, ref = ImageSet(recons), ImageSet(stimuli or reference)
    keys = pair_keys(rset, ref)
    rset.check(keys)
    ref.check(keys)
    metrics = tuple(m for m in METRICS if not (pixel_only and m.network))
    missing = missing_weights(weights_dir, metrics)
    if missing:
        from .eval.features import NETWORKS

        need = "; ".join(f"{NETWORKS[n].files[0]} ({', '.join(ms)})" for n, ms in missing.items())
        where = f"in {weights_dir}" if weights_dir else "(no --weights-dir given)"
        click.echo(f"note: feature metrics skipped, weights not found {where}: {need}", err=True)
    if len(missing) < len({m.network for m in metrics if m.network}):
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError as e:
            raise NsdedgeError(f"feature metrics need torch and torchvision ({e.name} is missing): "
                               f"pip install 'nsdedge[eval]', or pass --pixel-only") from None
    with click.progressbar(length=len(keys), label=f"{len(keys)} images", file=sys.stderr) as bar:
        progress = _done_counter(bar)
        result = evaluate(rset, ref, preset=preset, weights_dir=weights_dir, fidelity=reference is not None,
                          metrics=metrics, progress=progress)
    result["command"], result["nsdedge_version"] = " ".join(sys.argv), __version__
    click.echo(format_metrics(result))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        # strict JSON: identical images (PSNR inf) give "inf", an undefined metric (NaN) null
        atomic_write_bytes(json_out, json_text(result).encode())
        click.echo(f"wrote {json_out}")
    if sheet:
        show = keys[:sheet_count]
        sheet.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(sheet, png_bytes(contact_sheet(ref.read(show), rset.read(show))))
        click.echo(f"wrote {sheet} ({len(show)} pairs)")


class _Terminated(BaseException):
    """SIGTERM (a scheduler's kill, `timeout`): raised where the command is, so that what it was writing is cleaned
    up as for Ctrl-C (a BaseException: no `except Exception` on the way takes it for an error of its own)."""


def _terminated(signum, frame) -> None:
    raise _Terminated


def main() -> None:
    # onnxruntime >= 1.29 sends 1DS telemetry on Linux and macOS, and writes a device id into the user's cache as it
    # is imported, unless ORT_DISABLE_TELEMETRY is set before it starts (measured with 1.32: the id file appears
    # without it, not with it). The command line sets it for its own process and the processes it starts (a local
    # Ray); a value the user set stands. The Python API leaves the environment alone (README: Privacy).
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    signal.signal(signal.SIGTERM, _terminated)       # the command's own process: Python's default ends it at once
    try:
        cli.main(standalone_mode=False, prog_name="nsdedge")
    except NsdedgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:     # a bad option or value: one line, as for every other bad input
        if type(e).__name__ == "NoArgsIsHelpError":       # `nsdedge` alone: the help, as click prints it
            e.show()
            sys.exit(e.exit_code)
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("terminated", err=True)
        sys.exit(143)
    except MemoryError:
        click.echo("error: out of memory", err=True)
        sys.exit(2)
    except OSError as e:          # the machine said no (permissions, a full disk, a read-only mount): one line
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
