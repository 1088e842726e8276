"""TAEHV tiny video autoencoder (Wan 2.1 latents): model in ``model``, block streaming in ``stream``."""
