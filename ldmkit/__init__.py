"""ldmkit: latent diffusion training, sampling, evaluation and serving."""

__version__ = "0.1.0"
