"""LoRA interchange with the formats the rest of the community uses: kohya/webui/LyCORIS files, diffusers, HCP-Diffusion."""

from peft_hcp.hub.interchange.comfyui import export_comfyui
from peft_hcp.hub.interchange.diffusers_lora import export_diffusers, save_diffusers_lora
from peft_hcp.hub.interchange.hcp import import_hcp
from peft_hcp.hub.interchange.kohya import export_kohya, import_kohya
from peft_hcp.hub.interchange.names import kohya_name, kohya_name_table


__all__ = [
    "export_comfyui",
    "export_diffusers",
    "export_kohya",
    "import_hcp",
    "import_kohya",
    "kohya_name",
    "kohya_name_table",
    "save_diffusers_lora",
]
