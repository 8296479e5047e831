"""Milliseconds per training step of the toy UNet's block layouts, on one thread.

    python benchmarks/unet_layout.py                   # batch 16 (a process's share of 32), 60 steps
    python benchmarks/unet_layout.py --batch 32 --steps 100

Times forward and backward of a randomly initialised toy-sd15 UNet
(`unifl.models.toy_presets.toy_configs`) on random 8x8 latents, timesteps and
text embeddings, for the preset's layout and, in the same run, for variants
of it:

- `compact` (`bootstrap.unet_layout=compact`): cross-attention in the 4x4
  block and the mid block only, through linear projections;
- each half of it alone: no attention at 8x8, and linear projections;
- toy-sd15's own layout under bf16 autocast (`torch.autocast("cpu")`), the
  weights in fp32: whether this CPU's bf16 kernels shorten the step.

Each row is the mean over `--steps` after 5 warm-up steps, rows interleaved
over `--rounds` so that the machine's speed drifting moves all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

BF16 = "toy-sd15, bf16 autocast"


def layouts() -> dict[str, dict]:
    """UNet configs by name: toy-sd15's own, its compact layout, and each half of that."""
    from unifl.models.toy_presets import UNET_LAYOUTS, toy_configs

    own = toy_configs("toy-sd15")["unet"]
    compact = UNET_LAYOUTS["compact"]
    no_attention = {key: compact[key] for key in ("down_block_types", "up_block_types")}
    return {
        "toy-sd15": own,
        "compact": toy_configs("toy-sd15", unet_layout="compact")["unet"],
        "no attention at 8x8": {**own, **no_attention},
        "linear projections": {**own, "use_linear_projection": True},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    configs = layouts()
    configs[BF16] = configs["toy-sd15"]
    models = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        models[name] = UNet2DConditionModel(**config).train()
    seconds: dict[str, list[float]] = {name: [] for name in models}

    def step(unet, bf16: bool) -> None:
        config = unet.config
        latents = torch.randn(
            args.batch, config.in_channels, config.sample_size, config.sample_size,
            generator=generator,
        )  # fmt: skip
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
        embeds = torch.randn(args.batch, 16, config.cross_attention_dim, generator=generator)
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = unet(latents, timesteps, encoder_hidden_states=embeds).sample
        prediction.float().pow(2).mean().backward()

    for _ in range(args.rounds):
        for name, unet in models.items():
            for _ in range(5):
                step(unet, name == BF16)
            started = time.perf_counter()
            for _ in range(args.steps):
                step(unet, name == BF16)
            seconds[name].append((time.perf_counter() - started) / args.steps)

    print(
        f"toy-sd15 UNet, forward + backward of batch {args.batch} on one thread, "
        f"ms a step (mean of {args.rounds} rounds of {args.steps} steps, min-max)"
    )
    preset_ms = statistics.mean(seconds["toy-sd15"]) * 1000
    print(
        f"  {'layout':40s} {'parameters':>10s} {'ms / step':>10s} {'range':>13s} {'vs preset':>9s}"
    )
    for name, unet in models.items():
        values = [value * 1000 for value in seconds[name]]
        mean = statistics.mean(values)
        parameters = sum(p.numel() for p in unet.parameters())
        print(
            f"  {name:40s} {parameters:10d} {mean:10.1f} {min(values):6.1f}-{max(values):6.1f} "
            f"{mean / preset_ms:8.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
