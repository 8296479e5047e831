"""The mini-batch loop the bootstrap's small side models share (toy segmenter, toy CLIP)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from unifl.models.precision import adamw


def warmup_cosine_learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 5% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_on_minibatches(
    parameters: Iterable[torch.nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    num_items: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    generator: torch.Generator,
    description: str,
    progress: bool = True,
) -> dict[str, float]:
    """AdamW for `steps` steps, each on `loss_of(index)` for a batch of random item indices.

    The indices are drawn from `generator` (`loss_of` may draw from it too, after
    them); the learning rate follows `warmup_cosine_learning_rate`. Returns
    steps, final_loss (mean of the last 10% of steps; NaN without steps) and seconds.
    """
    optimizer = adamw(parameters, lr=learning_rate, weight_decay=weight_decay)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_learning_rate(step, steps, learning_rate)
        index = torch.randint(num_items, (min(batch_size, num_items),), generator=generator)
        loss = loss_of(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = losses[-max(1, steps // 10) :]
    return {
        "steps": float(steps),
        "final_loss": statistics.fmean(tail) if tail else float("nan"),
        "seconds": time.perf_counter() - started,
    }
