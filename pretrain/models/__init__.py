"""Backbones: ResNets with torchvision names (backbones.py), ViTs with timm names (vit.py), both
``Backbone`` subclasses (base.py)."""
