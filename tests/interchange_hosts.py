"""A tiny SDXL pipeline, built locally from configs, for the interchange tests (latents, not images)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from peft_hcp.embedded import tiny_vae, tokenizer_path
from peft_hcp.embedded.models import SDXL_TEXT_EMBEDS, tiny_clip_text_config, tiny_sdxl_unet


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's layout at toy size: two CLIP encoders (32 + 32 = the UNet's 64 cross-attention features)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(32, projection_dim=SDXL_TEXT_EMBEDS)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(32, projection_dim=SDXL_TEXT_EMBEDS)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path())
    vae: AutoencoderKL = tiny_vae(seed)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_latents(pipe: StableDiffusionXLPipeline, steps: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            "a cat",
            num_inference_steps=steps,
            height=32,
            width=32,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images


def tiny_wan(seed: int = 0, image_dim: int | None = None):
    """A Wan 2.1 DiT (T2V; I2V with ``image_dim``): two blocks, head size 8, patch (1, 2, 2), 4 latent channels."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4)
    config.update(text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
    return WanTransformer3DModel(**config, qk_norm="rms_norm_across_heads", image_dim=image_dim).eval()


def wan_inputs(batch: int = 2, seed: int = 0, image_dim: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
        "timestep": torch.tensor([10, 500][:batch]),
    }
    if image_dim:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 5, image_dim, generator=g)
    return inputs


def tiny_qwen_image(seed: int = 0):
    """A Qwen-Image MMDiT: two blocks, head size 8, packed latents of 16 channels."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8)
    return QwenImageTransformer2DModel(
        **config, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)
    )


def qwen_image_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=g),  # 4x4 packed latent tokens
        "encoder_hidden_states": torch.randn(batch, 7, 16, generator=g),
        "encoder_hidden_states_mask": torch.ones(batch, 7, dtype=torch.long),
        "timestep": torch.tensor([0.01, 0.5][:batch]),
        "img_shapes": [(1, 4, 4)] * batch,
    }
