"""Image encoders (Wan I2V's CLIP ViT-H/14 in ``clip``)."""
