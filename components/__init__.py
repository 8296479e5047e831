"""The pipeline's KFP components, one file per step, built for a given container image.

A lightweight component bakes its base image into the compiled pipeline when it is
created, so each module here defines the plain step function and `make_component(image)`,
and `build_components` builds them all for the images chosen at compile time (the CPU
image, and the CUDA image for the GPU steps). The function bodies import the project
inside the function: they run in the image, where `unifl` is installed.
"""

from __future__ import annotations

import importlib
from typing import Any

COMPONENT_MODULES: tuple[str, ...] = (
    "resolve_config",
    "finish_tracking",
    "bootstrap_toy",
    "curate_prompts",
    "validate_data",
    "generate_pairs",
    "label_preferences",
    "push_to_label_studio",
    "pull_labels",
    "log_data_lineage",
    "train_reward",
    "pefl",
    "decoupled",
    "adversarial",
    "evaluate",
    "promote",
)
"""Every step of the pipelines, by module name."""

GPU_COMPONENTS: frozenset[str] = frozenset(
    {"generate_pairs", "train_reward", "pefl", "decoupled", "adversarial", "evaluate"}
)
"""Steps that run a diffusion or reward model at scale: they get the CUDA image and a GPU."""


def default_image() -> str:
    """`unifl:<package version>`, the tag `make image` builds for the CPU image."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"unifl:{version('unifl')}"
    except PackageNotFoundError:
        return "unifl:latest"


def gpu_image_for(image: str) -> str:
    """The CUDA image beside a CPU image: `NAME:TAG-cuda`, as `make image` tags it."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return f"{image}:latest-cuda"
    return f"{name}:{tag}-cuda"


def build_components(image: str, gpu_image: str | None = None) -> dict[str, Any]:
    """Every component, keyed by module name, with its base image set."""
    gpu_image = gpu_image or gpu_image_for(image)
    built = {}
    for name in COMPONENT_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        built[name] = module.make_component(gpu_image if name in GPU_COMPONENTS else image)
    return built
