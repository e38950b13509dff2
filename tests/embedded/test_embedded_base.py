"""The shipped embedded base: loaded strictly from safetensors, its VAE reconstructs, its samples follow
prompts, it never learned the held-out concept, and ``pretrain-base`` reproduces what it writes."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_hcp.embedded.pipeline import (
    SCALING_FACTOR_KEY,
    embedded_pipeline,
    load_base_weights,
    save_base_weights,
    untrained_pipeline,
)
from peft_hcp.embedded.pretrain import PretrainPlan, follow_prompts, pretrain
from peft_hcp.errors import CheckpointError
from peft_hcp.train.concept import colour_score, concept_score, shape_score
from peft_hcp.train.data import (
    BASE_COLOURS,
    CONCEPT_COLOUR,
    KINDS,
    ShapesDataset,
    concept_dataset,
    to_image,
)
from peft_hcp.train.sampling import render
from peft_hcp.train.settings import SampleSettings


SEEDS = (0, 1)


@pytest.fixture(scope="module")
def base():
    pipe = embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _samples(pipe, prompts):
    sampling = SampleSettings()  # as a training run samples
    images = render(pipe, prompts, SEEDS, sampling.steps, sampling.guidance_scale, resolution=32)
    return images, [prompt for prompt in prompts for _ in SEEDS]


@pytest.mark.parametrize("colours", ["base", "concept"])
def test_vae_reconstructs_shapes_in_base_and_held_out_colours(base, colours):
    dataset = ShapesDataset(16, 32, seed=99) if colours == "base" else concept_dataset(16, 32, seed=99, kinds=KINDS)
    pixels = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
    with torch.no_grad():
        reconstruction = base.vae.decode(base.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    assert (reconstruction - pixels).abs().mean() * 127.5 < 8.0  # mean error in 0..255 levels (shipped: 6)
    images, captions = [to_image(r) for r in reconstruction], [dataset[i]["caption"] for i in range(len(dataset))]
    assert concept_score(images, captions) == 1.0 and shape_score(images, captions) == 1.0


def test_samples_show_the_prompted_colour_and_shape(base):
    images, prompts = _samples(base, follow_prompts(BASE_COLOURS))  # 7 colours x 3 shapes x 2 seeds
    assert colour_score(images, prompts) >= 0.85
    assert shape_score(images, prompts) >= 0.7


def test_the_base_never_learned_the_concept_colour(base):
    images, prompts = _samples(base, follow_prompts([CONCEPT_COLOUR]))
    assert colour_score(images, prompts) <= 0.2


def _token(pipe, word: str) -> int:
    (token,) = pipe.tokenizer(word, add_special_tokens=False).input_ids  # one token each
    return token


def test_the_text_encoder_never_trained_on_the_concept_word(base):
    """Provenance of the shipped file, cheaply: pre-training (AdamW without weight decay, then its average) moves
    the embedding of a token only if a caption holds it, so the concept word's is still its seeded initial value,
    and every base colour word's has moved."""
    initial = untrained_pipeline().text_encoder.get_input_embeddings().weight.half().float()
    shipped = base.text_encoder.get_input_embeddings().weight
    assert torch.equal(shipped[_token(base, CONCEPT_COLOUR)], initial[_token(base, CONCEPT_COLOUR)])
    for colour in BASE_COLOURS:
        assert not torch.equal(shipped[_token(base, colour)], initial[_token(base, colour)]), colour


def test_base_weights_load_strictly(tmp_path):
    path = str(tmp_path / "base.safetensors")
    saved = untrained_pipeline(seed=3)
    saved.vae.register_to_config(scaling_factor=0.5)
    save_base_weights(saved, path)
    rebuilt = untrained_pipeline(seed=0)
    load_base_weights(rebuilt, path)
    for name in ("vae", "text_encoder", "unet"):
        ours, theirs = getattr(saved, name).state_dict(), getattr(rebuilt, name).state_dict()
        assert all(torch.equal(ours[k].half().float(), theirs[k]) for k in ours), name  # fp16 on disk
    assert rebuilt.vae.config.scaling_factor == 0.5

    tensors = load_file(path)
    dropped = next(k for k in tensors if k.startswith("unet."))
    tensors.pop(dropped)
    save_file(tensors, path, metadata={SCALING_FACTOR_KEY: "1.0"})
    target = untrained_pipeline()
    before = {
        name: {k: v.clone() for k, v in getattr(target, name).state_dict().items()}
        for name in ("vae", "text_encoder", "unet")
    }
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(path)} does not fit the pipeline's unet: missing {re.escape(dropped[5:])}\.",
    ):
        load_base_weights(target, path)
    for name, state in before.items():  # nothing was copied: the vae and text encoder come before the unet
        assert all(torch.equal(state[k], v) for k, v in getattr(target, name).state_dict().items()), name


def test_pretraining_is_deterministic(tmp_path):
    plan = PretrainPlan(vae_steps=2, vae_batch=4, pool=8, steps=2, batch=4, warmup=1, threads=1)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pretrain(plan, str(first))
    pretrain(plan, str(second))
    assert first.read_bytes() == second.read_bytes()
    untrained = tmp_path / "untrained.safetensors"
    save_base_weights(untrained_pipeline(plan.seed), str(untrained))
    assert first.read_bytes() != untrained.read_bytes()  # it did train
