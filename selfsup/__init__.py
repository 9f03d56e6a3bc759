"""selfsup: distributed self-supervised pretraining for images."""
__version__ = "0.1.0"
