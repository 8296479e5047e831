"""How much of a real image's structure reaches PeFL's x0 prediction, by start step T_a.

    python benchmarks/pefl_start_step.py                  # the params.yaml bootstrap
    python benchmarks/pefl_start_step.py --starts 3 5 10  # other start steps
    python benchmarks/pefl_start_step.py --starts 5 --model runs/toy_table/seed-0/pefl/model

PeFL compares the segmenter's reading of x0' with the *real* image's masks,
but x0' comes from the real latents noised to step `T_a` of the 20-step
schedule and denoised by the model without gradients down to the gradient
step: what the noise destroyed, the model re-invents, and no gradient at the
last step can bring the real layout back. This measures, on held-out toy
images, the toy segmenter's PeFL loss and the caption-match of x0' from
start steps `T_a` (averaged over the gradient steps `0..min(T_a,
pefl.max_step)` the trainer draws from, with the trainer's guidance), next
to the same figures for the real images and for the VAE's reconstructions
(the floor no UNet can go below), with the noise level (`abar`) of each
start step. The paper's `T_a = 10` of 20 comes from SD's
64x64 latents; the toy's are 8x8, where the same `abar` leaves less of a
small object. `--model` measures another model on the same images, noise and
segmenter, e.g. the PeFL stage's output: whether PeFL lowered the loss it
optimises on images it was not trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--starts", type=int, nargs="+", default=[2, 3, 5, 7, 10, 14])
    parser.add_argument("--images", type=int, default=256, help="held-out images to score")
    parser.add_argument(
        "--bootstrap", type=Path, default=None, help="a bootstrap directory (default: the cache)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the model to measure, e.g. a PeFL stage's `model` (default: the bootstrap's base)",
    )
    args = parser.parse_args(argv)

    import torch

    from unifl.config import load_params
    from unifl.feedback.sampling import FeedbackSchedule, feedback_sample, noise_latents
    from unifl.models.base import (
        decode_latents,
        encode_images,
        encode_prompt,
        load_base_model,
        unconditional_embeds,
    )
    from unifl.models.precision import apply_num_threads
    from unifl.models.segmenter import ToySegmenter
    from unifl.toy.bootstrap import bootstrap_toy_world
    from unifl.toy.caption_match import caption_match
    from unifl.toy.dataset import load_toy_arrays

    params = load_params(args.params, preset=args.preset, overrides=args.overrides)
    apply_num_threads(params.project)
    directory = args.bootstrap or bootstrap_toy_world(params).directory
    model_dir = args.model or directory / "base"
    model = load_base_model(model_dir)
    segmenter = ToySegmenter.load(directory / "segmenter")
    data = load_toy_arrays(directory / "data" / "eval")
    count = min(args.images, len(data.captions))
    images = data.image_tensor()[:count]
    masks = data.semantic_tensor()[:count].long()
    captions = data.captions[:count]
    trainer = params.trainer
    schedule = FeedbackSchedule.from_scheduler(model.scheduler, trainer.num_inference_steps)

    def scores(pixels: torch.Tensor) -> tuple[float, float]:
        """PeFL's loss against the real masks, and caption-match against the captions."""
        return float(segmenter.loss(pixels, masks)), caption_match(segmenter, pixels, captions).rate

    def row(name: str, loss: float, rate: float) -> str:
        return f"  {name:<34} {loss:10.3f} {rate:14.3f}"

    print(f"PeFL's x0 prediction by start step: {count} held-out toy images, model {model_dir}")
    print(f"  {'':<34} {'PeFL loss':>10} {'caption-match':>14}")
    generator = torch.Generator().manual_seed(params.project.seed)
    with torch.no_grad():
        latents = encode_images(model, images)
        print(row("real images", *scores(images)))
        print(row("VAE reconstructions (the floor)", *scores(decode_latents(model, latents))))
        embeds = encode_prompt(model, captions)
        uncond = unconditional_embeds(model, count)
        noise = torch.randn(latents.shape, generator=generator)
        for start in sorted(set(args.starts)):
            if not 0 <= start < schedule.num_steps:
                parser.error(f"--starts: {start} is outside the {schedule.num_steps}-step schedule")
            # The trainer draws the gradient step uniformly from [0, max_step]: average over them.
            steps = range(min(start, params.pefl.max_step) + 1)
            noisy = noise_latents(latents, noise, schedule.alpha(start))
            per_step = [
                scores(
                    feedback_sample(
                        model, noisy, schedule, start, grad_step, embeds, uncond,
                        guidance_scale=trainer.guidance_scale,
                        grad_guidance_scale=trainer.grad_guidance_scale,
                    ).images
                )
                for grad_step in steps
            ]  # fmt: skip
            losses, rates = zip(*per_step, strict=True)
            name = (
                f"T_a {start:>2} (t {schedule.timestep(start):>3}, abar "
                f"{schedule.alpha(start):.2f}), steps 0-{steps[-1]}"
            )
            print(row(name, sum(losses) / len(losses), sum(rates) / len(rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
