"""``peft-hcp pretrain-base`` (or ``python -m peft_hcp.embedded.pretrain``): pre-train the embedded base.

Trains the tiny pipeline of :func:`peft_hcp.embedded.pipeline.untrained_pipeline` and writes
``peft_hcp/embedded/assets/base.safetensors`` (fp16, about 2 MB). Two stages:

1. the VAE learns to reconstruct uncaptioned shapes in random colours (mean squared error and a small KL
   term): an image codec for any colour. Its latent scaling factor is then set, as Stable Diffusion's
   was, to one over the standard deviation of the latents;
2. the UNet and the CLIP text encoder learn together to predict the noise added to the latents of
   captioned shapes in the base colours (:data:`peft_hcp.train.data.BASE_COLOURS`): the held-out concept
   colour is never shown to them, neither as a word nor as a shape's colour (the VAE of stage 1 has seen
   cyan-like pixels among its random colours, but no word). The latents of a fixed pool of
   images are encoded once (the VAE is frozen by then), which makes a step a UNet step. The loss is
   ``peft-hcp train``'s, weighted by min-SNR (Hang et al. 2023) to learn faster; a tenth of the captions are
   left empty, so classifier-free guidance works; the weights kept are an exponential moving average.

Deterministic: every image is a pure function of its index and every random draw comes from generators
seeded by ``--seed``, so the same torch version and thread count reproduce the file bit for bit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peft_hcp.commands.pretrain import PretrainPlan


#: Seeds of the samples the base is measured on (:func:`measure`).
FOLLOW_SEEDS = (0, 1, 2)


def _batches(dataset, batch: int, steps: int):
    """Consecutive items of ``dataset``, ``batch`` at a time, as a dict of stacked pixels and their captions."""
    for step in range(steps):
        items = [dataset[step * batch + i] for i in range(batch)]
        yield {"pixels": torch.stack([i["pixels"] for i in items]), "caption": [i.get("caption") for i in items]}


def train_vae(vae, plan: PretrainPlan, resolution: int) -> None:
    """Stage 1: reconstruction of shapes in any colour; sets ``vae.config.scaling_factor``."""
    from tqdm.auto import tqdm

    from peft_hcp.train.data import AnyColourShapes

    dataset = AnyColourShapes(plan.vae_steps * plan.vae_batch, resolution, seed=plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, plan.vae_lr, total_steps=plan.vae_steps, pct_start=0.1)
    vae.train()
    bar = tqdm(_batches(dataset, plan.vae_batch, plan.vae_steps), total=plan.vae_steps, desc="vae")
    for batch in bar:
        posterior = vae.encode(batch["pixels"]).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch["pixels"]) + plan.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.5f}")
    vae.eval().requires_grad_(False)
    probe = AnyColourShapes(512, resolution, seed=plan.seed + 2)
    with torch.no_grad():
        latents = torch.cat([vae.encode(b["pixels"]).latent_dist.mean for b in _batches(probe, 64, 8)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))


@torch.no_grad()
def encode_pool(pipe, plan: PretrainPlan, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents (the VAE's posterior means) and captions of the stage-2 image pool."""
    from peft_hcp.train.data import ShapesDataset

    dataset = ShapesDataset(plan.pool, resolution, seed=plan.seed + 1)
    items = [dataset[i] for i in range(plan.pool)]
    pixels = torch.stack([item["pixels"] for item in items])
    latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    return latents * pipe.vae.config.scaling_factor, [item["caption"] for item in items]


def train_denoiser(pipe, plan: PretrainPlan, resolution: int) -> None:
    """Stage 2: the UNet and text encoder on the noise-prediction loss; ends with their averaged weights."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
    from tqdm.auto import tqdm

    latents, captions = encode_pool(pipe, plan, resolution)
    texts = sorted(set(captions)) + [""]  # the few distinct captions, tokenized once; "" for dropped ones
    tokenizer, scheduler = pipe.tokenizer, pipe.scheduler
    token_ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([texts.index(c) for c in captions])
    generator = torch.Generator().manual_seed(plan.seed + 1)
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=plan.warmup, num_training_steps=plan.steps)
    ema = EMAModel(params, decay=plan.ema_decay)
    pipe.unet.train()
    pipe.text_encoder.train()
    bar = tqdm(range(plan.steps), desc="unet + text encoder")
    for _ in bar:
        picked = torch.randint(len(latents), (plan.batch,), generator=generator)
        texts_used = caption_index[picked].masked_fill(
            torch.rand(plan.batch, generator=generator) < plan.caption_dropout, len(texts) - 1
        )
        clean = latents[picked]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (plan.batch,), generator=generator)
        text = pipe.text_encoder(token_ids[texts_used])[0]
        prediction = pipe.unet(scheduler.add_noise(clean, noise, timesteps), timesteps, text).sample
        snr = compute_snr(scheduler, timesteps)
        weights = snr.clamp(max=plan.snr_gamma) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    pipe.unet.eval()
    pipe.text_encoder.eval()


@dataclass
class BaseFigures:
    """What the base has learned: reconstruction error and how well samples follow prompts."""

    vae_error: float  # mean absolute error of reconstructions of base-colour images, in 0..255 levels
    vae_error_concept: float  # the same on images in the held-out concept colour
    colour_score: float  # fraction of samples showing the prompted colour
    shape_score: float  # fraction of samples showing the prompted shape
    concept_score: float  # fraction of samples of concept prompts showing the concept colour

    def __str__(self) -> str:
        return (
            f"VAE reconstruction error {self.vae_error:.2f}/255 (held-out colour {self.vae_error_concept:.2f}/255); "
            f"prompted colour {self.colour_score:.3f}, prompted shape {self.shape_score:.3f}; "
            f"concept colour on concept prompts {self.concept_score:.3f}"
        )


def follow_prompts(colours) -> list[str]:
    """One prompt per colour and shape: ``"a large red circle"``."""
    from peft_hcp.train.data import SHAPES

    return [f"a large {colour} {shape}" for colour in colours for shape in SHAPES]


def measure(pipe, items: int = 64, seeds=FOLLOW_SEEDS) -> BaseFigures:
    """:class:`BaseFigures` of ``pipe`` on ``items`` images per colour set and ``follow_prompts`` x ``seeds``,
    sampled as ``peft-hcp train`` samples (its default steps and guidance)."""
    from peft_hcp.embedded.pipeline import default_resolution
    from peft_hcp.train.concept import colour_score, shape_score
    from peft_hcp.train.data import (
        BASE_COLOURS,
        CONCEPT_COLOUR,
        KINDS,
        ShapesDataset,
        concept_dataset,
    )
    from peft_hcp.train.sampling import render
    from peft_hcp.train.settings import SampleSettings

    resolution = default_resolution(pipe)
    sampling = SampleSettings()

    @torch.no_grad()
    def vae_error(dataset) -> float:
        pixels = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
        reconstruction = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        return (reconstruction - pixels).abs().mean().item() * 127.5

    prompts = follow_prompts(BASE_COLOURS)
    images = render(pipe, prompts, seeds, sampling.steps, sampling.guidance_scale, resolution=resolution)
    per_image = [p for p in prompts for _ in seeds]
    concept_prompts = follow_prompts([CONCEPT_COLOUR])
    concept_images = render(
        pipe, concept_prompts, seeds, sampling.steps, sampling.guidance_scale, resolution=resolution
    )
    return BaseFigures(
        vae_error=vae_error(ShapesDataset(items, resolution, seed=12345)),
        vae_error_concept=vae_error(concept_dataset(items, resolution, seed=12345, kinds=KINDS)),
        colour_score=colour_score(images, per_image),
        shape_score=shape_score(images, per_image),
        concept_score=colour_score(concept_images, [p for p in concept_prompts for _ in seeds]),
    )


def pretrain(plan: PretrainPlan, out: str):
    """Both stages from the untrained pipeline; writes ``out`` and returns the trained pipeline."""
    from peft_hcp.embedded.pipeline import (
        default_resolution,
        save_base_weights,
        untrained_pipeline,
    )

    torch.set_num_threads(plan.threads)
    pipe = untrained_pipeline(plan.seed)
    pipe.set_progress_bar_config(disable=True)
    resolution = default_resolution(pipe)
    train_vae(pipe.vae, plan, resolution)
    train_denoiser(pipe, plan, resolution)
    save_base_weights(pipe, out)
    return pipe


if __name__ == "__main__":
    from peft_hcp.cli import main

    sys.exit(main(["pretrain-base", *sys.argv[1:]]))
