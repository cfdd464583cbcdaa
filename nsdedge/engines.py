"""Moved: the engine cache and runner are nsdedge.runtime.trt_engine, the builder nsdedge.export.trt_build.
These names stay importable from here for code written against earlier releases."""

from .export.trt_build import build_engine, build_engines, record_engine  # noqa: F401
from .runtime.trt_engine import (ENGINE_COMPONENTS, WORKSPACE_BYTES, Device, EngineKey, EngineSession,  # noqa: F401
                                 builder_flags, check_engine, engine_key, engine_paths, pick_profile, profile_shapes,
                                 this_device)
