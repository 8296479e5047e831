"""UniFL: unified feedback learning for latent diffusion models."""

__version__ = "0.1.0"
