"""Reconstruction metrics (metrics.py), their feature networks (features.py) and image sets (images.py).

numpy, scipy and Pillow for the pixel metrics; torch, torchvision and transformers for the feature networks.
Imports nothing from nsdedge.export.
"""
