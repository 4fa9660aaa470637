"""Parameter-efficient adapters (LoRA through peft) for the UNet and the text encoder."""

from ldm.adapters.lora import (
    TEXT_TARGETS,
    UNET_TARGETS,
    LoraWeight,
    add_lora,
    has_lora,
    load_lora,
    lora_parameters,
    lora_weights,
    merge_lora,
    merged_copy,
    remove_lora,
    set_lora_scale,
    target_names,
    unmerge_lora,
)

__all__ = [
    "TEXT_TARGETS", "UNET_TARGETS", "LoraWeight", "add_lora", "has_lora", "load_lora", "lora_parameters",
    "lora_weights", "merge_lora", "merged_copy", "remove_lora", "set_lora_scale", "target_names",
    "unmerge_lora",
]  # fmt: skip
