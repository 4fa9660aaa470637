"""Thin LightningModules: wiring, logging and optimizers around `ldm.nn` networks and `ldm.losses` /
`ldm.diffusion` math (DESIGN "LightningModules are thin"). Import the module you need, e.g.
`ldm.systems.autoencoder.AutoencoderSystem`; nothing is imported here, so importing one system does not
pull in the others' dependencies."""
