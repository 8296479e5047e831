"""Feedback learning: sampling math, losses, the trainer and the three UniFL stages.

Names are re-exported lazily, so importing one light submodule (for example
`unifl.feedback.losses`) does not import accelerate, peft or diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # sampling
    "FeedbackSchedule": "unifl.feedback.sampling",
    "feedback_sample": "unifl.feedback.sampling",
    # losses
    "aesthetic_hinge_loss": "unifl.feedback.losses",
    "discriminator_loss": "unifl.feedback.losses",
    "generator_adversarial_loss": "unifl.feedback.losses",
    "noise_prediction_mse": "unifl.feedback.losses",
    # trainer
    "FeedbackTrainer": "unifl.feedback.trainer",
    "NonFiniteLossError": "unifl.feedback.trainer",
    "ResumeError": "unifl.feedback.trainer",
    "TrainingError": "unifl.feedback.trainer",
    # stages
    "AdversarialTrainer": "unifl.feedback.adversarial",
    "DecoupledTrainer": "unifl.feedback.decoupled",
    "PeflTrainer": "unifl.feedback.pefl",
    "StageResult": "unifl.feedback.stages",
    "run_adversarial": "unifl.feedback.stages",
    "run_decoupled": "unifl.feedback.stages",
    "run_pefl": "unifl.feedback.stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unifl.feedback' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
