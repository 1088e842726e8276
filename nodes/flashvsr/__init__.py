"""FlashVSR: streaming video super-resolution (LQ projector, block-sparse DiT, TCDecoder, colour fix)."""
