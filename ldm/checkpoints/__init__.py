"""State-dict maps and checkpoint files: our (original SD) layout <-> diffusers, single files, folders.

Our networks use the original CompVis/Stability key names natively (those of the released single files,
so community checkpoints load without conversion); everything here converts to and from other layouts.
Maps take and return plain `dict[str, Tensor]` without prefixes.
"""

from ldm.checkpoints.autoencoder_file import load_autoencoder, save_autoencoder
from ldm.checkpoints.configs import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from ldm.checkpoints.detect import detect_format, is_run_folder
from ldm.checkpoints.diffusers_folder import DiffusersFolder, load_diffusers_folder, save_diffusers_folder
from ldm.checkpoints.io import (
    DamagedCheckpointError,
    UnsafeCheckpointError,
    atomic_write,
    check_safetensors,
    check_training_checkpoint,
    read_state_dict,
    write_state_dict,
)
from ldm.checkpoints.single_file import (
    SingleFileCheckpoint,
    join_state_dict,
    load_single_file,
    save_single_file,
    split_state_dict,
)
from ldm.checkpoints.text_map import (
    drop_last_text_layers,
    fit_clip_keys,
    infer_clip_text_config,
    normalize_clip_keys,
    open_clip_to_transformers,
    transformers_to_open_clip,
)
from ldm.checkpoints.unet_map import unet_from_diffusers, unet_to_diffusers
from ldm.checkpoints.vae_map import vae_from_diffusers, vae_to_diffusers

__all__ = [
    "DamagedCheckpointError",
    "DiffusersFolder",
    "SingleFileCheckpoint",
    "UnsafeCheckpointError",
    "atomic_write",
    "check_safetensors",
    "check_training_checkpoint",
    "detect_format",
    "drop_last_text_layers",
    "fit_clip_keys",
    "infer_clip_text_config",
    "is_run_folder",
    "join_state_dict",
    "load_autoencoder",
    "load_diffusers_folder",
    "load_single_file",
    "normalize_clip_keys",
    "open_clip_to_transformers",
    "read_state_dict",
    "save_autoencoder",
    "save_diffusers_folder",
    "save_single_file",
    "split_state_dict",
    "transformers_to_open_clip",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
    "write_state_dict",
]
