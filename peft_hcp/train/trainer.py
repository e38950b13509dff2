"""The training loop: noise-prediction loss on a Stable Diffusion pipeline, plugins only, via accelerate.

Runs as is on one device, under ``accelerate launch --num_processes N`` (DDP) and under ``accelerate launch
--use_fsdp --fsdp_version 2`` (FSDP2, sharded by :mod:`peft_hcp.train.fsdp`): each process draws its own
micro-batches, gradients are averaged across processes, the main process writes checkpoints, samples and the
log. Every random draw (batch indices, noise, timesteps) is a function of the seed, step and rank,
so a resumed run continues exactly where the interrupted one would have gone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from peft_hcp.base.components import pipeline_components
from peft_hcp.embedded.pipeline import default_resolution, load_pipeline
from peft_hcp.fsdp import held_bytes
from peft_hcp.hooked import feed
from peft_hcp.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from peft_hcp.train.concept import (
    BeforeAfter,
    colour_score,
    concept_score,
    control_iou,
    leak_rate,
    shape_score,
)
from peft_hcp.train.data import (
    CONCEPT_COLOUR,
    batch_indices,
    collate,
    control_dataset,
    make_datasets,
    to_image,
)
from peft_hcp.train.fsdp import FsdpPlan, accelerate_without_fsdp, shard_for_training
from peft_hcp.train.plugins import SECTIONS, PluginEntry, attach_plugins, parse_section
from peft_hcp.train.sampling import grid, needs_condition, render_off_on


LOG_NAME = "train.log"


@dataclass
class TrainResult:
    """What a run did, for callers and tests."""

    output_dir: str
    main_process: bool
    start_step: int
    end_step: int
    checkpoint: Optional[str]
    losses: list[float] = field(default_factory=list)
    eval_loss_start: float = math.nan
    eval_loss_end: float = math.nan
    it_per_s: float = math.nan
    samples: list[str] = field(default_factory=list)
    score: Optional[BeforeAfter] = None  # of the last samples; None unless the data are the generated shapes
    details: list[BeforeAfter] = field(default_factory=list)  # what the score is made of (see Trainer._scores)
    seconds: float = math.nan


def _logger(output_dir: str, main: bool) -> logging.Logger:
    logger = logging.getLogger(f"peft_hcp.train.{os.path.abspath(output_dir)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if main:
        handler = logging.FileHandler(os.path.join(output_dir, LOG_NAME), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def _has_accelerator_device() -> bool:
    """Whether torch sees a GPU-like device. Without one, accelerate needs ``cpu=True`` to run a
    multi-process launch as CPU DDP (gloo) instead of as N unrelated single processes."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def _keep_training_layout(model: torch.nn.Module) -> None:
    """Keep bnb 4-bit layers in the layout they train in. On a CPU with AVX512-BF16, bitsandbytes repacks a
    ``Linear4bit`` weight for bf16 inference at its first eval ``no_grad`` forward (the eval loss, the samples),
    and its packed kernel cannot train afterwards; without the repack, evaluation computes as training does."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class Batches:
    """Tokenised micro-batches with their noise and timesteps, drawn deterministically per step."""

    def __init__(self, pipe, dataset, settings: DictConfig, rank: int) -> None:
        self.pipe, self.dataset, self.settings, self.rank = pipe, dataset, settings, rank

    def tokens(self, captions: list[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def draw(self, step: int, micro: int) -> dict:
        s = self.settings
        indices = batch_indices(len(self.dataset), s.batch_size, step, micro, s.seed, self.rank)
        batch = collate([self.dataset[i] for i in indices])
        rng = np.random.default_rng([s.seed, step, micro, self.rank, 1])
        if s.caption_dropout > 0:
            batch["caption"] = ["" if rng.random() < s.caption_dropout else c for c in batch["caption"]]
        batch["input_ids"] = self.tokens(batch["caption"])
        batch["generator"] = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return batch


class Trainer:
    """One training run described by ``settings`` (see :mod:`peft_hcp.train.settings`)."""

    def __init__(self, settings: DictConfig, entries: Optional[list[PluginEntry]] = None) -> None:
        """``entries`` replaces the config's plugin sections (e.g. entries built from PEFT's own configs)."""
        self.settings = settings
        threads = settings.threads or (1 if settings.pretrained_model is None else 0)
        if threads:  # the embedded pipeline's tensors are tiny: more threads only wait on each other
            torch.set_num_threads(threads)
        if entries is None:
            entries = [e for section in SECTIONS for e in parse_section(section, settings[section])]
        self.fsdp = FsdpPlan.from_env()
        with accelerate_without_fsdp(self.fsdp):  # the trainer shards itself: see peft_hcp.train.fsdp
            self.accelerator = Accelerator(
                mixed_precision=settings.mixed_precision,
                gradient_accumulation_steps=settings.grad_accum,
                cpu=not _has_accelerator_device(),
            )
        self.main = self.accelerator.is_main_process
        self.output_dir = settings.output_dir
        if self.main:
            os.makedirs(self.output_dir, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.log = _logger(self.output_dir, self.main)
        self.pipe = load_pipeline(settings.pretrained_model)
        self.pipe.set_progress_bar_config(disable=True)
        self.resolution = settings.resolution or default_resolution(self.pipe)
        if settings.quantize is not None:  # before the plugins attach, so that they wrap the quantized layers
            from peft_hcp.quant import quantize_model

            quantize_model(self.pipe.unet, settings.quantize)
            _keep_training_layout(self.pipe.unet)
        self.groups = attach_plugins(pipeline_components(self.pipe), entries)
        self.entries = entries
        self.train_te = any(e.component == "text_encoder" for e in entries)
        if settings.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            if self.train_te:
                self.pipe.text_encoder.activation_checkpointing_enable()
        self.conditioned = needs_condition(self.pipe)
        self.dataset, self.held_out = make_datasets(
            settings.data, self.resolution, settings.data_size, settings.seed, settings.eval_size, self.conditioned
        )
        self.pipe.to(self.accelerator.device)
        self.pipe.vae.requires_grad_(False)
        models = [self.pipe.unet] + ([self.pipe.text_encoder] if self.train_te else [])
        for model in models:
            model.train()
        if self.fsdp is None:
            optimizer = torch.optim.AdamW(self.groups, weight_decay=settings.weight_decay)
            prepared = self.accelerator.prepare(*models, optimizer)
        else:  # sharded in place, never wrapped in DDP: only the optimizer goes through accelerate
            components = [self.pipe.unet, self.pipe.text_encoder]
            self.groups = shard_for_training(
                self.fsdp, self.accelerator, components, self.groups, settings.mixed_precision
            )
            optimizer = torch.optim.AdamW(self.groups, weight_decay=settings.weight_decay)
            prepared = (*models, self.accelerator.prepare(optimizer))
        self.unet = prepared[0]
        self.text_encoder = prepared[1] if self.train_te else self.pipe.text_encoder
        self.optimizer = prepared[-1]
        self.batches = Batches(self.pipe, self.dataset, settings, self.accelerator.process_index)

    # -- one step ---------------------------------------------------------------------------------
    def loss(self, batch: dict) -> torch.Tensor:
        device = self.accelerator.device
        pixels = batch["pixels"].to(device)
        generator = batch["generator"]
        with torch.no_grad():
            latents = self.pipe.vae.encode(pixels).latent_dist.sample(generator)
            latents = latents * self.pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        scheduler = self.pipe.scheduler
        timesteps = batch.get("timesteps")
        if timesteps is None:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        grad = torch.enable_grad() if self.train_te else torch.no_grad()
        with self.accelerator.autocast():
            with grad:
                text = self.text_encoder(batch["input_ids"].to(device))[0]
            feeding = feed(self.unet, cond=batch["cond"].to(device)) if self.conditioned else contextlib.nullcontext()
            with feeding:
                prediction = self.unet(noisy, timesteps, text).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    @torch.no_grad()
    def eval_loss(self) -> float:
        """The loss on the held-out items, which the run never trains on, with fixed noise and timesteps spread
        evenly over the schedule: comparable across steps and runs. NaN when no item is held out."""
        if len(self.held_out) == 0:
            return math.nan
        batch = collate([self.held_out[i] for i in range(len(self.held_out))])
        batch["input_ids"] = self.batches.tokens(batch["caption"])
        batch["generator"] = torch.Generator().manual_seed(self.settings.seed + 12345)
        train_steps = self.pipe.scheduler.config.num_train_timesteps
        batch["timesteps"] = (torch.arange(len(self.held_out)) * 2 + 1) * train_steps // (2 * len(self.held_out))
        with self._eval_mode():
            return self.loss(batch).item()

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        s = self.settings
        began_run = time.perf_counter()
        start = 0
        resume_from = latest_checkpoint(self.output_dir) if s.resume else None
        if resume_from is not None:
            start = load_checkpoint(self.pipe, resume_from, self.optimizer)
            for group, entry in zip(self.optimizer.param_groups, self.entries):
                group["lr"] = entry.lr  # the config's learning rate wins over the checkpoint's
        result = TrainResult(self.output_dir, self.main, start, start, resume_from)
        if self.main:
            OmegaConf.save(s, os.path.join(self.output_dir, "config.yaml"))
            self._describe(resume_from, start)
        result.eval_loss_start = self.eval_loss()
        self.log.info(
            "eval loss at step %d (%d held-out items): %.5f", start, len(self.held_out), result.eval_loss_start
        )
        # no bar but on a terminal (None): a bar in a log file or a captured stream is noise; train.log has the steps
        bar = tqdm(total=s.steps, initial=start, desc="train", disable=None if self.main else True, dynamic_ncols=True)
        ema, began = None, time.perf_counter()
        for step in range(start + 1, s.steps + 1):
            step_loss = 0.0
            for micro in range(s.grad_accum):
                with self.accelerator.accumulate(self.unet, *([self.text_encoder] if self.train_te else [])):
                    loss = self.loss(self.batches.draw(step, micro))
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and s.max_grad_norm:
                        params = [p for g in self.optimizer.param_groups for p in g["params"]]
                        self.accelerator.clip_grad_norm_(params, s.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().item() / s.grad_accum
            step_loss = self.accelerator.reduce(torch.tensor(step_loss, device=self.accelerator.device), "mean").item()
            result.losses.append(step_loss)
            ema = step_loss if ema is None else 0.9 * ema + 0.1 * step_loss
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", avg=f"{ema:.4f}")
            rate = (step - start) / (time.perf_counter() - began)
            if s.log_every and step % s.log_every == 0:
                self.log.info("step %d/%d loss %.5f avg %.5f %.2f it/s", step, s.steps, step_loss, ema, rate)
            if (s.save_every and step % s.save_every == 0) or step == s.steps:
                result.checkpoint = self._save(step)
            if s.sample_every and step % s.sample_every == 0 and step != s.steps:
                path, scores = self._samples(step)
                result.samples.append(path)
                if scores:
                    self.log.info("samples at step %d: %s", step, "; ".join(map(str, scores)))
        bar.close()
        result.end_step = max(start, s.steps)
        if result.end_step > start:
            result.it_per_s = (result.end_step - start) / (time.perf_counter() - began)
        result.eval_loss_end = self.eval_loss()
        self.log.info(
            "done: eval loss %.5f -> %.5f, %.2f it/s, adapters in %s",
            result.eval_loss_start,
            result.eval_loss_end,
            result.it_per_s,
            result.checkpoint,
        )
        path, scores = self._samples(result.end_step)
        result.samples.append(path)
        if scores:
            result.score, result.details = scores[0], scores[1:]
            self.log.info("%s", result.score)
            self.log.info("%s", "; ".join(map(str, result.details)))
        result.seconds = time.perf_counter() - began_run
        self.log.info("run took %.1f s", result.seconds)
        self.accelerator.wait_for_everyone()
        return result

    def _describe(self, resume_from: Optional[str], start: int) -> None:
        world = self.accelerator.num_processes
        self.log.info(
            "run in %s: %s, %s, %d process(es), batch %d x accum %d, %d steps",
            self.output_dir,
            self.settings.pretrained_model or "embedded tiny pipeline",
            self.settings.data or f"generated shapes ({len(self.dataset)})",
            world,
            self.settings.batch_size,
            self.settings.grad_accum,
            self.settings.steps,
        )
        for group in self.groups:
            count = sum(p.numel() for p in group["params"])
            self.log.info(
                "plugin %s: lr %g, %d tensors, %d parameters", group["name"], group["lr"], len(group["params"]), count
            )
        if self.fsdp is not None:
            held, whole = held_bytes(self.pipe.unet, trainable=False)
            self.log.info("FSDP2: this rank holds %d of the UNet's %d frozen bytes", held, whole)
        if resume_from:
            self.log.info("resumed from %s (step %d)", resume_from, start)

    def _save(self, step: int) -> Optional[str]:
        """Every rank takes part (a sharded model's weights are gathered collectively); the main process writes."""
        extra = {"pretrained_model": self.settings.pretrained_model, "seed": self.settings.seed}
        folder = save_checkpoint(self.pipe, self.output_dir, step, self.optimizer, extra, is_main_process=self.main)
        self.accelerator.wait_for_everyone()
        if not self.main:
            return None
        self.log.info("saved checkpoint %s", folder)
        return folder

    def _sample_inputs(self) -> tuple[list[str], Optional[torch.Tensor], Optional[list]]:
        """The prompts, the condition images of a conditioned run, and the images those were made from.

        On the generated shapes, a run samples its prompts and then the leak prompts; a conditioned run
        instead takes ``sample.conditions`` held-out items (the next seed), with their captions as prompts.
        On a folder, a conditioned run takes its first items, one per prompt."""
        s = self.settings.sample
        generated = self.settings.data is None
        if not self.conditioned:
            return list(s.prompts) + (list(s.leak_prompts) if generated else []), None, None
        if generated:
            held_out = control_dataset(s.conditions, self.resolution, self.settings.seed + 1)
            items = [held_out[i] for i in range(s.conditions)]
            prompts = [item["caption"] for item in items]
        else:
            prompts = list(s.prompts)
            items = [self.dataset[i % len(self.dataset)] for i in range(len(prompts))]
        return prompts, torch.stack([item["cond"] for item in items]), [to_image(item["pixels"]) for item in items]

    def _scores(self, prompts: list[str], off: list, on: list, sources: Optional[list]) -> list[BeforeAfter]:
        """What the samples show, adapters off and on; only on the generated shapes (what the detector of
        :mod:`peft_hcp.train.concept` reads).

        A conditioned run: the control IoU, then the IoU of the same samples with the images of the other
        conditions (a rotation by one), the chance level. Else: the concept score of the prompts, then its
        parts, colour and shape, and the leak rate of the concept's colour on the leak prompts."""
        if self.settings.data is not None:
            return []
        repeat = len(self.settings.sample.seeds)
        if sources is not None:
            references = [source for source in sources for _ in range(repeat)]
            others = references[repeat:] + references[:repeat]
            return [
                BeforeAfter("control iou", control_iou(off, references), control_iou(on, references)),
                BeforeAfter("chance", control_iou(off, others), control_iou(on, others)),
            ]
        per_image = [prompt for prompt in prompts for _ in range(repeat)]
        scored = len(self.settings.sample.prompts) * repeat
        scores = [
            BeforeAfter(name, score(off[:scored], per_image[:scored]), score(on[:scored], per_image[:scored]))
            for name, score in (("concept score", concept_score), ("colour", colour_score), ("shape", shape_score))
        ]
        if scored < len(per_image):
            leak_prompts = per_image[scored:]
            before, after = (leak_rate(images[scored:], leak_prompts, CONCEPT_COLOUR) for images in (off, on))
            scores.append(BeforeAfter("leak", before, after))
        return scores

    def _samples(self, step: int) -> tuple[Optional[str], list[BeforeAfter]]:
        """Render, score and write the off | on grid of the fixed prompts and seeds (the main process; under FSDP
        every rank renders, as a sharded forward is a collective, and only the main process scores and writes)."""
        if not self.main and self.fsdp is None:
            return None, []
        s = self.settings.sample
        prompts, cond, sources = self._sample_inputs()
        device_cond = None if cond is None else cond.to(self.accelerator.device)
        with self._eval_mode():
            off, on = render_off_on(
                self.pipe, prompts, list(s.seeds), s.steps, s.guidance_scale, device_cond, self.resolution
            )
        if not self.main:
            return None, []
        scores = self._scores(prompts, off, on, sources)
        title = f"step {step}" + (f" - {scores[0]}" if scores else "")
        conditions = None if cond is None else [to_image(c * 2 - 1) for c in cond]
        path = os.path.join(self.output_dir, "samples", f"step-{step:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid(off, on, prompts, title, conditions).save(path)
        self.log.info("samples (adapters off | on) written to %s", path)
        return path, scores

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """The UNet and text encoder in eval mode (no dropout) for the block, then as training has them."""
        self.pipe.unet.eval()
        self.pipe.text_encoder.eval()
        try:
            yield
        finally:
            self.pipe.unet.train()
            self.pipe.text_encoder.train(self.train_te)


def train(settings: DictConfig) -> TrainResult:
    return Trainer(settings).run()
