"""OmniDreams' inputs: HD-map frames from a video file (PyAV) or pushed per block, the LightVAE streaming
encoder (the Wan VAE at a reduced width read from the weights), the 192-channel pixel-shuffle HD-map encoder,
precomputed text embeddings, and the clear errors for frames whose count or size does not fit the chunk."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml

import engine
from engine.errors import FdError
from engine.node import Step

H, W = 64, 96


def write_video(path: Path, frames: np.ndarray) -> None:
    """uint8 [T, H, W, 3] -> a lossless FFV1 file, so the decoded pixels are the written ones."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=30)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def video_node(**params):
    from nodes.omnidreams.hdmap import HDMapVideoNode
    return HDMapVideoNode("hd", {"latent_frames": 2, "height": H, "width": W, **params}, "cpu")


@pytest.fixture
def clip(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(13, H, W, 3), dtype=np.uint8)
    write_video(tmp_path / "hd.mkv", frames)
    return tmp_path / "hd.mkv", frames


def test_video_is_read_chunk_by_chunk(clip):
    path, frames = clip
    node = video_node(path=[str(path), str(path)])            # two views, same file
    state = node.new_state()
    got = [node.run({}, state, Step(block=b, inputs={}))["frames"] for b in range(2)]
    assert [g.shape for g in got] == [(2, 5, 3, H, W), (2, 8, 3, H, W)]        # 1 + 4 then 4 x 2 frames
    want = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(torch.cat(got, 1)[0], want, atol=1e-6, rtol=0)
    with pytest.raises(FdError, match=r"ended after 13 frames; block 2 needs frames 13 \.\. 20"):
        node.run({}, state, Step(block=2, inputs={}))
    node.close(state)


def test_video_of_another_size_or_missing_is_a_clear_error(clip, tmp_path):
    path, _ = clip
    node = video_node(path=[str(path)], height=H * 2)
    with pytest.raises(FdError, match=rf"needs \[views, 5, 3, {2 * H}, {W}\]"):
        node.run({}, node.new_state(), Step(block=0, inputs={}))
    node = video_node(path=[str(tmp_path / "nope.mp4")])
    with pytest.raises(FdError, match="nope.mp4"):
        node.run({}, node.new_state(), Step(block=0, inputs={}))


def test_pushed_frames_are_checked_per_block():
    node = video_node()
    ok = torch.rand(1, 8, 3, H, W) * 2 - 1
    torch.testing.assert_close(node.run({"frames": ok}, node.new_state(), Step(block=1, inputs={}))["frames"], ok)
    u8 = torch.randint(0, 256, (1, 5, H, W, 3), dtype=torch.uint8)
    got = node.run({"frames": u8}, node.new_state(), Step(block=0, inputs={}))["frames"]
    torch.testing.assert_close(got, u8.permute(0, 1, 4, 2, 3).float() / 127.5 - 1)
    with pytest.raises(FdError, match=r"block 0 got HD-map frames \[1, 8, 3, 64, 96\]; it needs \[views, 5"):
        node.run({"frames": ok}, node.new_state(), Step(block=0, inputs={}))


def test_pixel_shuffle_encoder_equals_a_per_pixel_loop():
    from nodes.omnidreams.hdmap import HDMapPixelShuffleNode
    for block, n, sel in ((0, 13, [0, 4, 8, 12]), (1, 16, [3, 7, 11, 15])):
        x = torch.randn(2, n, 3, 16, 24)
        got = HDMapPixelShuffleNode("ps", {"latent_frames": 4}, "cpu").run({"frames": x}, None, Step(block=block, inputs={}))
        z = got["latent"]
        assert z.shape == (2, 4, 192, 2, 3)
        for v, t, c, i, j in ((1, 2, 2, 1, 2), (0, 0, 0, 0, 0), (1, 3, 1, 1, 1)):
            for h8, w8 in ((0, 0), (3, 5), (7, 7)):
                assert z[v, t, c * 64 + h8 * 8 + w8, i, j] == x[v, sel[t], c, i * 8 + h8, j * 8 + w8]
    with pytest.raises(FdError, match="it needs"):
        HDMapPixelShuffleNode("ps", {"latent_frames": 4}, "cpu").run({"frames": torch.zeros(1, 12, 3, 16, 24)},
                                                                   None, Step(block=0, inputs={}))


def test_lightvae_stream_encoder_reads_its_width_and_equals_the_whole_clip(tmp_path):
    """A Wan VAE state dict in the original key layout at a quarter-like width (LightVAE's pruning): the node's
    `dim` param says 96, the weights say otherwise, and the weights win; chunked encodes concatenate to the
    whole-clip encode."""
    from nodes.checkpoint import random_init
    from nodes.wan.node_vae import WanVAEStreamEncodeNode
    from nodes.wan.vae import WanVAE
    with torch.device("meta"):
        ref = WanVAE(dim=8)
    random_init(ref, 3, device="cpu", dtype=torch.float32)
    ref.latent_mean.copy_(torch.linspace(-1, 1, 16))
    ref.latent_std.copy_(torch.linspace(0.5, 2, 16))
    torch.save({k: v for k, v in ref.state_dict().items()}, tmp_path / "lightvae.pth")
    node = WanVAEStreamEncodeNode("enc", {"checkpoint": str(tmp_path / "lightvae.pth"), "latent_frames": 2,
                                          "channels_last": False, "dtype": "fp32"}, "cpu")
    node.load()
    assert node.vae.encoder.conv1.weight.shape[0] == 8
    ref.latent_mean.copy_(node.vae.latent_mean)
    ref.latent_std.copy_(node.vae.latent_std)
    video = torch.rand(1, 13, 3, 32, 48) * 2 - 1
    state = node.new_state()
    got = torch.cat([node.run({"frames": video[:, :5]}, state, Step(block=0, inputs={}))["latent"],
                     node.run({"frames": video[:, 5:]}, state, Step(block=1, inputs={}))["latent"]], 1)
    want = ref.encode(video.transpose(1, 2)).transpose(1, 2)
    assert got.shape == (1, 4, 16, 4, 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(FdError, match=r"block 2 got frames \[1, 5, 3, 32, 48\]; it needs \[B, 8, 3, H, W\]"):
        node.run({"frames": video[:, :5]}, state, Step(block=2, inputs={}))


def test_text_embeddings_file_checks_the_width(tmp_path):
    from safetensors.torch import save_file

    from nodes.text.embeddings_file import TextEmbeddingsFileNode
    save_file({"embeds": torch.randn(7, 32), "negative": torch.randn(1, 7, 32)}, str(tmp_path / "t.safetensors"))
    node = TextEmbeddingsFileNode("t", {"path": str(tmp_path / "t.safetensors"), "negative_key": "negative",
                                        "width": 32}, "cpu")
    out = node.run({}, None, Step(block=None, inputs={}))
    assert out["embeds"].shape == (1, 7, 32) and out["negative_embeds"].shape == (1, 7, 32)
    node = TextEmbeddingsFileNode("t", {"path": str(tmp_path / "t.safetensors"), "width": 100352}, "cpu")
    with pytest.raises(FdError, match=r"is \[1, 7, 32\]; expected \[L, 100352\]"):
        node.run({}, None, Step(block=None, inputs={}))


def test_tiny_pipeline_with_pushed_hdmap_frames_through_the_stream_encoder(tmp_path):
    """The real graph at tiny size: frames pushed per block -> LightVAE-layout stream encoder -> DiT."""
    spec = yaml.safe_load((Path(__file__).parents[1] / "specs" / "tiny_omnidreams.yaml").read_text())
    spec["inputs"]["hdmap_frames"] = None
    spec["nodes"]["hdmap_frames"] = {"type": "omnidreams.hdmap_video", "device": "cpu",
                                     "in": {"frames": "inputs.hdmap_frames"},
                                     "params": {"latent_frames": 2, "height": 64, "width": 96}}
    spec["nodes"]["hdmap"] = {"type": "wan.vae_encode_stream", "device": "cpu", "in": {"frames": "hdmap_frames.frames"},
                              "params": {"checkpoint": "random", "dim": 8, "latent_frames": 2, "dtype": "fp32"}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    pipe = engine.load(p).load()
    with pipe.open_session() as s:
        lats = []
        for n in (5, 8, 8):
            s.set_input("hdmap_frames", torch.rand(1, n, 3, 64, 96) * 2 - 1)
            lats.append(s.step().outputs["sampler"]["latent"])
        assert all(t.shape == (1, 2, 16, 8, 12) and torch.isfinite(t).all() for t in lats)
        s.set_input("hdmap_frames", torch.rand(1, 5, 3, 64, 96))
        with pytest.raises(FdError, match="block 3 got HD-map frames"):
            s.step()


def tiny_overrides(tmp_path, frames_path, image_path, text_path) -> list[str]:
    """omnidreams_sv's graph at a tiny size on the CPU: every model node random, the inputs real files."""
    dit = dict(checkpoint="random", model_channels=48, num_blocks=2, num_heads=3, crossattn_emb_channels=24,
               crossattn_proj_in_channels=32, adaln_lora_dim=8, text_len=16, dtype="fp32")
    out = [f"inputs.image={image_path}", f"inputs.hdmap={frames_path}", f"inputs.text={text_path}",
           "inputs.num_blocks=2", "nodes.text.params.width=32", f"sinks.video.params.path={tmp_path / 'o.mp4'}",
           "nodes.sampler.params.latent_height=8", "nodes.sampler.params.latent_width=12",
           "nodes.decoder.params.checkpoint=random", "nodes.decoder.params.channels=[32,16,16,16]",
           "nodes.decoder.params.dtype=fp32"]
    for n in ("image", "hdmap_frames"):
        out += [f"nodes.{n}.params.height={H}", f"nodes.{n}.params.width={W}"]
    for n in ("image_latent", "hdmap"):
        out += [f"nodes.{n}.params.checkpoint=random", f"nodes.{n}.params.dim=8", f"nodes.{n}.params.dtype=fp32"]
    out += [f"nodes.dit.params.{k}={v}" for k, v in dit.items()]
    out += [f"nodes.{n}.device=cpu" for n in ("text", "image", "image_latent", "hdmap_frames", "hdmap", "dit",
                                               "sampler", "decoder")]
    return out


def test_omnidreams_sv_graph_runs_at_tiny_size(clip, tmp_path):
    """The released single-view spec's own graph (text file -> DiT; image -> LightVAE -> first-frame stamp;
    HD-map video -> LightVAE stream -> hdmap; LightTAE decode), with random tiny weights: it streams, block 0
    starts with the encoded first frame, and the video's frames are consumed 5 then 8."""
    from safetensors.torch import save_file
    path, frames = clip
    write_video(tmp_path / "first.mkv", frames[:1])
    save_file({"embeds": torch.randn(16, 32)}, str(tmp_path / "t.safetensors"))
    pipe = engine.load("omnidreams_sv", overrides=tiny_overrides(tmp_path, path, tmp_path / "first.mkv",
                                                                 tmp_path / "t.safetensors")).load()
    with pipe.open_session() as s:
        outs = [s.step().outputs for _ in range(2)]
        image = s.values["image_latent"]["latent"]
        assert s.states["hdmap_frames"].read == 13
    lat = [o["sampler"]["latent"] for o in outs]
    assert [t.shape for t in lat] == [(1, 2, 16, 8, 12)] * 2
    torch.testing.assert_close(lat[0][:, :1], image, atol=1e-4, rtol=0)      # the stamped first frame
    assert all(torch.isfinite(o["decoder"]["pixels"]).all() for o in outs)
