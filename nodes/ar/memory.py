"""`ar.sampler`'s share of the memory plan (engine/memory.py): the session state it makes the model hold.

The sampler decides the cache's size (batch, sink, window or num_blocks, latent size) and the model
decides its layout, so the model node feeding ``model`` is asked for ``cache_layout()`` (layers, heads,
head size, patch, dtype bytes, widths, and ``kv_copies``: how many independent caches per sample, e.g. 2 for
classifier-free guidance with a cache per branch) and the product is taken here: the self-attention K/V rows, the
float32 sink copy of ``rope_mode: relative``, the cross-attention K/V of the prompt (static buffers),
and, with a global cache, the noise of every block. Activations are a rough bound for one DiT call over
a block: its tokens times (FFN width + 8 hidden widths), in the model's dtype.
"""
from __future__ import annotations

FP32 = 4


def rollout_frames(p) -> int:
    """Latent frames of ``num_blocks`` blocks (block 0 has ``first_block_frames`` when set: Wan 2.2's 1)."""
    first = p.frames_per_block if getattr(p, "first_block_frames", None) is None else p.first_block_frames
    return first + (p.num_blocks - 1) * p.frames_per_block


def kv_cache(p, layout: dict) -> dict:
    """The self-attention K/V rows the sampler's stream will allocate for a model of this layout."""
    frames = p.window_frames if p.window_frames is not None else rollout_frames(p)
    ph, pw = layout["patch"]
    ft = (p.latent_height // ph) * (p.latent_width // pw)
    nbytes = (2 * layout["num_layers"] * p.batch * frames * ft * layout["num_heads"] * layout["head_dim"]
              * layout.get("kv_copies", 1))
    return {"sink_frames": p.sink_frames, "window_frames": frames, "bounded": p.window_frames is not None,
            "frame_tokens": ft, "dtype": layout.get("kv_dtype", layout.get("dtype", "")),
            "bytes": int(nbytes * layout.get("kv_bytes_per_value", layout["dtype_bytes"]))}


def sampler_memory(p, model_node) -> dict:
    nfpb, c, lh, lw, b = p.frames_per_block, p.latent_channels, p.latent_height, p.latent_width, p.batch
    frames = p.window_frames if p.window_frames is not None else rollout_frames(p)
    noise = 0 if p.window_frames is not None else b * rollout_frames(p) * c * lh * lw * FP32
    layout = getattr(model_node, "cache_layout", None)
    if layout is None:
        return {"weights": 0, "weights_source": "", "state": noise,
                "state_what": "noise; the model node declares no cache_layout(), so its cache is not counted"}
    m = layout()
    cache = kv_cache(p, m)
    ft, kv = cache["frame_tokens"], cache["bytes"]
    width = m["num_heads"] * m["head_dim"]
    sink = (m["num_layers"] * b * p.sink_frames * ft * width * FP32
            if p.rope_mode == "relative" and p.sink_frames else 0)
    cross = (2 * m["num_layers"] * b * (m["text_len"] + m.get("image_tokens", 0)) * width * m["dtype_bytes"]
             * m.get("kv_copies", 1))
    act = b * nfpb * ft * (m["ffn_dim"] + 8 * m["dim"]) * m["dtype_bytes"]
    return {"weights": 0, "weights_source": "", "state": kv + sink + cross + noise,
            "state_what": (f"KV cache {frames} frames x {ft} tokens ({kv / 2**20:.1f} MiB)"
                           + (f", sink fp32 copy {sink / 2**20:.1f} MiB" if sink else "")
                           + f", cross K/V {cross / 2**20:.1f} MiB"
                           + (f", noise {noise / 2**20:.1f} MiB" if noise else "")),
            "activations": act}
