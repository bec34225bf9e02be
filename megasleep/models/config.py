"""Typed model config (docs/architecture.md). Validated at load time so that a bad pattern letter, heads
that do not divide the width, or an impossible prelude/coda split fail with one message naming the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from megasleep.config import (
    ConfigError,
    StrictModel,
    apply_overrides,
    deep_update,
    load_config,
    read_config_file,
    resolve_path,
    validate,
)

MIXER_LETTERS = {"A": "attn", "M": "mamba2", "G": "gdn"}


class AttnConfig(StrictModel):
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="grouped-query heads; None = n_heads")
    head_dim: int | None = Field(None, ge=1, description="None = d_model // n_heads")
    rope_theta: float = Field(10000.0, gt=0)
    qkv_bias: bool = Field(False, description="biases on q/k/v projections (Qwen2, mamba_ssm MHA)")
    out_bias: bool = Field(False, description="bias on the output projection")
    softmax_scale: float | None = Field(None, gt=0, description="None = head_dim**-0.5")
    d_conv: int = Field(0, ge=0, description="width of a causal depthwise conv over q/k/v (with bias, no "
                                             "activation, as mamba_ssm's MHA); 0 = none")
    rotary_dim: int | None = Field(None, ge=0, description="RoPE on the first rotary_dim dims of each head "
                                                           "(partial rotary); None = whole head, 0 = no positions")
    qk_norm: bool = Field(False, description="RMSNorm (eps = norm_eps) over the whole projected q and over the "
                                             "whole projected k, before RoPE (OLMo-2/3, OLMo-Hybrid)")


class Mamba2Config(StrictModel):
    """Same names and meaning as mamba_ssm.modules.mamba2.Mamba2's constructor arguments."""

    d_state: int = Field(64, ge=1)
    d_conv: int = Field(4, ge=2)
    expand: int = Field(2, ge=1)
    headdim: int = Field(32, ge=1)
    ngroups: int = Field(1, ge=1)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = Field(0.001, gt=0)
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    chunk_size: int = Field(64, ge=1)
    norm_eps: float = Field(1e-5, gt=0, description="eps of the gated RMSNorm before out_proj")


class GDNConfig(StrictModel):
    """Same names as fla.layers.GatedDeltaNet where they overlap."""

    n_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=1)
    expand_v: float = Field(1.0, gt=0)
    d_conv: int = Field(4, ge=2)
    chunk_size: int = Field(64, ge=1)
    allow_neg_eigval: bool = Field(False, description="beta = 2 sigmoid(b_proj x) in [0, 2] instead of [0, 1]: "
                                                      "I - beta k k^T may have a negative eigenvalue (FLA's name)")
    norm_eps: float | None = Field(None, gt=0, description="eps of the gated RMSNorm before o_proj; None = norm_eps")
    l2norm: Literal["clamp", "fla"] = Field("clamp", description="q/k L2 norm: 'clamp' x / max(|x|, 1e-6) (torch's "
                                                                 "normalize); 'fla' x / sqrt(|x|^2 + 1e-6) (FLA's "
                                                                 "and transformers' kernels; differ for small |x|)")


class MLPConfig(StrictModel):
    """MLP hidden size as a multiple of d_model per block type; 0 means the block has no MLP."""

    A: float = Field(4.0, ge=0)
    M: float = Field(0.0, ge=0)
    G: float = Field(4.0, ge=0)
    multiple_of: int = Field(8, ge=1)
    activation: Literal["swiglu", "relu2"] = Field("swiglu", description="relu2: non-gated down(relu(up x)^2)")
    blocks: str | None = Field(None, description='per block "1" (has an MLP) or "0"; None = by letter ratio')


class ModelConfig(StrictModel):
    name: str = "model"
    vocab_size: int = Field(ge=2)
    d_model: int = Field(ge=1)
    pattern: str = Field(description='layer pattern, one letter per block: A=attn M=mamba2 G=gdn, e.g. "AGAG"')
    n_prelude: int = Field(0, ge=0, description="blocks before the looped core (run once per window)")
    n_coda: int = Field(0, ge=0, description="blocks after the looped core (run once per window)")
    post_norm: str = Field("", description='letters of the blocks that are post-norm, x + norm(mixer(x)) and '
                                           'x + norm(mlp(x)) (OLMo-Hybrid: "A"); the others are pre-norm')
    attn: AttnConfig = AttnConfig()
    mamba2: Mamba2Config = Mamba2Config()
    gdn: GDNConfig = GDNConfig()
    mlp: MLPConfig = MLPConfig()
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    kernels: Literal["auto", "torch", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        bad = sorted({c for c in self.pattern if c not in MIXER_LETTERS})
        if not self.pattern or bad:
            raise ValueError(
                f"pattern {self.pattern!r}: unknown block letter(s) {bad} (use A=attn, M=mamba2, G=gdn)")
        bad = sorted(set(self.post_norm) - set(MIXER_LETTERS))
        if bad:
            raise ValueError(f"post_norm={self.post_norm!r}: unknown block letter(s) {bad} (use A, M, G)")
        mb = self.mlp.blocks
        if mb is not None and (len(mb) != len(self.pattern) or set(mb) - {"0", "1"}):
            raise ValueError(f"mlp.blocks={mb!r}: one '0' / '1' per block of the {len(self.pattern)}-block pattern")
        if self.n_prelude + self.n_coda >= len(self.pattern):
            raise ValueError(f"n_prelude={self.n_prelude} + n_coda={self.n_coda} leave no core blocks "
                             f"in a {len(self.pattern)}-block pattern")
        if "A" in self.pattern:
            a = self.attn
            if a.head_dim is None and self.d_model % a.n_heads:
                raise ValueError(f"attn.n_heads={a.n_heads} does not divide d_model={self.d_model}")
            if a.n_heads % (a.n_kv_heads or a.n_heads):
                raise ValueError(f"attn.n_kv_heads={a.n_kv_heads} does not divide attn.n_heads={a.n_heads}")
            if self.attn_head_dim % 2:
                raise ValueError(f"attn head_dim={self.attn_head_dim} must be even for RoPE")
            if a.d_conv == 1:
                raise ValueError("attn.d_conv=1 is not a short conv (use 0 for none or >= 2)")
            rd = a.rotary_dim
            if rd is not None and (rd % 2 or rd > self.attn_head_dim):
                raise ValueError(f"attn.rotary_dim={rd} must be even and <= head_dim={self.attn_head_dim}")
        if "M" in self.pattern:
            m = self.mamba2
            d_inner = m.expand * self.d_model
            if d_inner % m.headdim:
                raise ValueError(f"mamba2.headdim={m.headdim} does not divide expand*d_model={d_inner}")
            if (d_inner // m.headdim) % m.ngroups:
                raise ValueError(f"mamba2.ngroups={m.ngroups} does not divide the {d_inner // m.headdim} heads")
        if "G" in self.pattern and (self.gdn.head_dim * self.gdn.expand_v) % 1:
            raise ValueError("gdn.head_dim * gdn.expand_v must be an integer")
        return self

    @property
    def attn_head_dim(self) -> int:
        return self.attn.head_dim or self.d_model // self.attn.n_heads

    @property
    def mixers(self) -> list[str]:
        return [MIXER_LETTERS[c] for c in self.pattern]

    def split(self) -> tuple[range, range, range]:
        """Block indices of prelude, core and coda."""
        n = len(self.pattern)
        return range(0, self.n_prelude), range(self.n_prelude, n - self.n_coda), range(n - self.n_coda, n)


def model_file_section(raw: dict[str, Any], source: str, cfg_dir: Path | None) -> dict[str, Any]:
    """The model keys of a config file: a model YAML (at top level or under ``model:``), an exported
    ``config.json`` (its extra keys dropped), or an experiment whose ``model`` names a file."""
    model = raw.get("model")
    if isinstance(model, str) or (isinstance(model, dict) and "base" in model):
        return model_section(model, source, cfg_dir)  # an experiment naming its model file
    data = dict(model) if isinstance(model, dict) else dict(raw)
    if source.endswith(".json"):  # config.json of an exported model: also sleep, source, ... entries
        data = {k: v for k, v in data.items() if k in ModelConfig.model_fields}
    return data


def model_section(model: Any, source: str, cfg_dir: Path | None) -> dict[str, Any]:
    """An experiment's ``model`` entry as one mapping: a path to a model file, or ``{base: path, ...}``
    (the file's keys with these changed), or every key inline."""
    if isinstance(model, str):
        model = {"base": model}
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: model: expected a path to a model YAML or a mapping, "
                          f"got {type(model).__name__}")
    data = copy.deepcopy(model)
    base = data.pop("base", None)
    if base is None:
        return data
    path = resolve_path(base, cfg_dir)
    if not path.is_file():
        raise ConfigError(f"{source}: model.base: model config file not found: {base}")
    return deep_update(model_file_section(read_config_file(path), str(path), path.parent), data)


def load_model_config(path=None, overrides=(), base=None) -> ModelConfig:
    """A model from any file that holds one (model YAML, exported config.json, experiment YAML), over
    ``base``, with dotted overrides (``d_model=128`` or ``model.d_model=128``)."""
    data = dict(base or {})
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        data.update(model_file_section(read_config_file(path), str(path), path.parent))
        source = str(path)
    overrides = [o[len("model."):] if o.startswith("model.") else o for o in overrides]
    if overrides:
        apply_overrides(data, overrides)
        source += " (with overrides " + " ".join(overrides) + ")"
    return validate(ModelConfig, data, source)


__all__ = ["AttnConfig", "ConfigError", "GDNConfig", "MLPConfig", "Mamba2Config", "ModelConfig",
           "load_config", "load_model_config"]
