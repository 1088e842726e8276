"""Wan 2.1 DiT hyper-parameters and how to recover them from checkpoint files."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

# Every released Wan 2.1 DiT (1.3B, 14B) uses 128-dim heads; the state dict
# cannot tell heads from head size, so this is the fallback for num_heads.
DEFAULT_HEAD_DIM = 128
RELEASE_DIMS = (1536, 5120)  # Wan 2.1 1.3B and 14B (Wan 2.2 A14B experts: 5120)


@dataclass(frozen=True)
class WanConfig:
    model_type: str = "t2v"          # 't2v' | 'i2v' (i2v adds img_emb + image K/V in cross-attention)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int = 1280            # I2V image-token width (CLIP ViT-H penultimate: 1280 in every release)
    sinusoid_dtype: str = "float64"  # timestep sinusoid: float64 (Wan-AI, Self-Forcing) or float32 (diffusers, FastVideo)
    control_type: str | None = None  # 'cam': LingBot-World camera layers (Plücker patch embedding + per-block injector)

    def __post_init__(self):
        if self.sinusoid_dtype not in ("float32", "float64"):
            raise ValueError(f"sinusoid_dtype must be 'float32' or 'float64', got {self.sinusoid_dtype!r}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.control_type not in (None, "cam"):
            raise ValueError(f"control_type must be null or 'cam', got {self.control_type!r}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_config_json(cls, d: dict, state_dict: dict | None = None) -> "WanConfig":
        """From a Wan-AI config.json (WanModel.save_config output) or case model_kwargs.

        That file omits patch_size, text_dim, qk_norm and cross_attn_norm (upstream's
        ignore_for_config), so they take upstream's defaults ((1,2,2), 4096, True, True)
        unless present; text_dim comes from `text_embedding.0.weight` when a state dict
        is given. Unknown keys (_class_name, window_size, ...) are ignored.
        """
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if state_dict is not None and "text_embedding.0.weight" in state_dict:
            cfg = replace(cfg, text_dim=state_dict["text_embedding.0.weight"].shape[1])
        return cfg

    @classmethod
    def from_diffusers_config(cls, d: dict, text_len: int = 512, where: str = "config.json") -> "WanConfig":
        """From a diffusers ``WanTransformer3DModel`` config.json (also FastVideo's causal Wan 2.2
        experts). Every size is read from the file; a size the file lacks is an error naming it,
        never a release default. ``text_len`` is not in the file (the text encoder's padding length)."""
        need = ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim", "in_channels", "text_dim")
        missing = [k for k in need if d.get(k) is None]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (a diffusers WanTransformer3DModel config "
                             "names every size)")
        heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
        qk = d.get("qk_norm", "rms_norm_across_heads")
        if qk not in (None, "rms_norm_across_heads"):
            raise ValueError(f"{where}: qk_norm {qk!r} is not supported (rms_norm_across_heads or null)")
        image_dim = d.get("image_dim")
        if image_dim is not None and d.get("added_kv_proj_dim") not in (None, heads * head_dim):
            raise ValueError(f"{where}: added_kv_proj_dim {d['added_kv_proj_dim']} != inner dim {heads * head_dim}")
        if d.get("pos_embed_seq_len") is not None:
            raise ValueError(f"{where}: pos_embed_seq_len (FLF2V image position embedding) is not supported")
        return cls(
            model_type="t2v" if image_dim is None else "i2v",
            patch_size=tuple(d.get("patch_size", (1, 2, 2))), text_len=text_len,
            in_dim=int(d["in_channels"]), dim=heads * head_dim, ffn_dim=int(d["ffn_dim"]),
            freq_dim=int(d.get("freq_dim", 256)), text_dim=int(d["text_dim"]),
            out_dim=int(d.get("out_channels") or d["in_channels"]), num_heads=heads, num_layers=int(d["num_layers"]),
            qk_norm=qk is not None, cross_attn_norm=bool(d.get("cross_attn_norm", True)),
            eps=float(d.get("eps", 1e-6)), image_dim=1280 if image_dim is None else int(image_dim),
            sinusoid_dtype="float32")

    def to_diffusers_config(self) -> dict:
        """The diffusers config.json fields of this config (the inverse of ``from_diffusers_config``)."""
        return {"_class_name": "WanTransformer3DModel", "patch_size": list(self.patch_size),
                "num_attention_heads": self.num_heads, "attention_head_dim": self.head_dim,
                "in_channels": self.in_dim, "out_channels": self.out_dim, "text_dim": self.text_dim,
                "freq_dim": self.freq_dim, "ffn_dim": self.ffn_dim, "num_layers": self.num_layers,
                "cross_attn_norm": self.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if self.qk_norm else None,
                "eps": self.eps, "image_dim": self.image_dim if self.model_type == "i2v" else None,
                "added_kv_proj_dim": self.dim if self.model_type == "i2v" else None,
                "rope_max_seq_len": 1024, "pos_embed_seq_len": None}

    def check_state_dict(self, sd, where: str = "checkpoint") -> None:
        """Refuse weights whose shapes contradict this config (before any tensor is read)."""
        got = WanConfig.from_state_dict(sd, num_heads=self.num_heads, text_len=self.text_len)
        diff = [f"{k}: config {getattr(self, k)} vs weights {getattr(got, k)}"
                for k in ("model_type", "patch_size", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
                          "num_layers", "qk_norm", "cross_attn_norm", "control_type")
                if getattr(self, k) != getattr(got, k)]
        if self.model_type == "i2v" and got.image_dim != self.image_dim:
            diff.append(f"image_dim: config {self.image_dim} vs weights {got.image_dim}")
        if diff:
            raise ValueError(f"{where}: config.json and weights disagree ({'; '.join(diff)})")

    @classmethod
    def from_state_dict(cls, sd: dict, num_heads: int | None = None, text_len: int = 512) -> "WanConfig":
        """Everything the weights determine. Not in the weights: num_heads and eps (1e-6) and
        text_len (default 512). Without ``num_heads`` the head count is dim // 128 only for a
        released Wan 2.1 width (1536, 5120); any other width is an error asking for it."""
        pe = sd["patch_embedding.weight"]                 # [dim, in_dim, pt, ph, pw]
        dim, in_dim, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
        if num_heads is None:
            if dim not in RELEASE_DIMS:
                raise ValueError(f"the weights have width {dim}, not a released Wan 2.1 width "
                                 f"({', '.join(map(str, RELEASE_DIMS))}): the head count is not in the weights; give "
                                 "num_heads, or load the checkpoint folder with its config.json")
            num_heads = dim // DEFAULT_HEAD_DIM
        layers = sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".modulation"))
        return cls(
            model_type="i2v" if "img_emb.proj.1.weight" in sd else "t2v",
            patch_size=patch, text_len=text_len, in_dim=in_dim, dim=dim,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
            text_dim=sd["text_embedding.0.weight"].shape[1],
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
            num_heads=num_heads, num_layers=layers,
            image_dim=sd["img_emb.proj.1.weight"].shape[1] if "img_emb.proj.1.weight" in sd else 1280,
            qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
            cross_attn_norm="blocks.0.norm3.weight" in sd,
            control_type="cam" if "patch_embedding_wancamctrl.weight" in sd else None)


WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_len=512)
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_len=512)
