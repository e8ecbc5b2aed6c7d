"""mnistdiff: train, sample, evaluate and edit diffusion models on MNIST."""

__version__ = "0.1.0"
