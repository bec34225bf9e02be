"""Adapter for ``mamba_ssm`` ``MambaLMHeadModel`` checkpoints (Mamba-2 and Mamba-2 + attention hybrids).

Reads the directory ``MambaLMHeadModel.save_pretrained`` writes (``config.json`` = ``MambaConfig``
fields, ``pytorch_model.bin`` = its state dict; a ``model.safetensors`` works too) without importing
mamba_ssm, and maps every tensor onto megasleep's HybridLM (mamba_ssm 2.3.2's module layout):

==========================================================  =============================================
mamba_ssm                                                    megasleep
==========================================================  =============================================
backbone.embedding.weight                                    embed_tokens.weight
backbone.layers.i.norm.weight                                layers.i.norm.weight
backbone.layers.i.mixer.{in_proj,conv1d,dt_bias,A_log,D,     layers.i.mixer.* (Mamba2: same names/shapes)
  norm,out_proj}
backbone.layers.i.mixer.in_proj.weight   (MHA)               rows [q | k | v] -> q_proj / k_proj / v_proj
  (q = num_heads*head_dim rows, then k, v = num_heads_kv*head_dim each: "(two hkv d)")
backbone.layers.i.mixer.out_proj.weight  (MHA)               layers.i.mixer.o_proj.weight
backbone.layers.i.norm2.weight                               layers.i.mlp_norm.weight
backbone.layers.i.mlp.fc1.weight  (GatedMLP)                 rows [:h] -> up_proj, rows [h:] -> gate_proj
  (GatedMLP computes ``y, gate = fc1(x).chunk(2); y * silu(gate)``: the FIRST half is the value)
backbone.layers.i.mlp.fc2.weight                             layers.i.mlp.down_proj.weight
backbone.norm_f.weight                                       norm_f.weight
lm_head.weight                                               lm_head.weight (tied: must equal the embedding)
==========================================================  =============================================

Semantic differences (documented in docs/evaluation.md):

* ``residual_in_fp32``: mamba_ssm keeps the residual stream in fp32 when the model runs in bf16/fp16;
  megasleep keeps it in the model dtype. Identical in fp32; a rounding difference in bf16.
* Attention in mamba_ssm's MHA is full causal attention over the whole sequence with RoPE at absolute
  positions; megasleep's is restricted to the current window (the sleep model). RoPE scores depend
  only on distances, so with ``window >= T`` and ``N = 1`` both compute the same function; with
  ``T > window`` the imported model is evaluated with eviction, which is the point of the experiment.
* Mamba-2's short-conv state runs on across the whole sequence in mamba_ssm; megasleep's hard
  eviction resets it at window boundaries (sliding eviction carries it), SSM state ``S`` is carried.
* ``MambaConfig.vocab_size`` is padded up to ``pad_vocab_size_multiple`` by mamba_ssm; the imported
  model has the padded vocabulary (the extra rows are never produced by a tokenizer).

Configurations that cannot be mapped faithfully are refused with an error naming the setting:
Mamba-1 layers, LayerNorm (``rms_norm: false``), Mamba2 options megasleep's mixer does not have
(``d_ssm`` < d_inner, ``D_has_hdim``, ``rmsnorm: false``, ``norm_before_gate: true``, ``dt_limit``,
``bias: true``, ``conv_bias: false``), and MHA options its attention does not have (``causal: false``,
interleaved rotary, ``mlp_dim > 0`` (parallel MLP inside MHA)). MHA's short conv over q/k/v
(``d_conv > 0``: ``conv1d`` -> ``qkv_conv1d``), partial rotary (``rotary_emb_dim`` < ``head_dim``: the
first dims rotate; 0: no positions), ``softmax_scale`` and q/k/v / output biases (``in_proj.bias`` split
like the weight) map onto megasleep's attention options, so the released ``mamba2attn`` checkpoints
(``d_conv=4``, ``rotary_emb_dim = head_dim/2``, biases) map completely, as do the pure Mamba-2 ones.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from megasleep.checkpoint.adapters.base import Adapter
from megasleep.checkpoint.errors import UnsupportedModelError
from megasleep.checkpoint.weights import CONFIG_NAME, load_weights, read_json
from megasleep.models.config import ModelConfig

MAMBA_CONFIG_KEYS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                     "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
# Mamba2 constructor arguments: mapped onto megasleep's Mamba2Config
SSM_MAPPED = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "A_init_range", "dt_min", "dt_max",
              "dt_init_floor")
# kernel / parallelism / init-only arguments that do not change the function
SSM_IGNORED = ("layer", "conv_init", "use_mem_eff_path", "sequence_parallel", "process_group", "layer_idx",
               "device", "dtype")
# arguments megasleep's mixer hard-wires: (default, why)
SSM_FIXED = {
    "d_ssm": (None, "megasleep's Mamba2 runs the SSM on all of d_inner (no extra gated-MLP channels)"),
    "D_has_hdim": (False, "megasleep's D is one scalar per head"),
    "rmsnorm": (True, "megasleep's Mamba2 always has the gated RMSNorm"),
    "norm_before_gate": (False, "megasleep's Mamba2 gates before the norm (Mamba-2's default)"),
    "dt_limit": ((0.0, math.inf), "megasleep does not clamp dt"),
    "bias": (False, "megasleep's in_proj / out_proj have no bias"),
    "conv_bias": (True, "megasleep's Mamba2 conv1d has a bias"),
}
ATTN_KEYS = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias", "softmax_scale",
             "causal", "layer_idx", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved",
             "device", "dtype"}


class MambaImportError(UnsupportedModelError):
    """A mamba_ssm checkpoint uses a setting megasleep cannot represent faithfully (named in the message)."""


def _refuse(where: str, msg: str):
    raise MambaImportError(f"{where}: cannot import faithfully: {msg}")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def convert_config(raw: dict, state: dict[str, torch.Tensor], where: str = "<mamba_ssm config>",
                   overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """MambaConfig dict (+ the tensors, for shapes) -> (ModelConfig, facts recorded as provenance)."""
    unknown = sorted(k for k in raw if k not in MAMBA_CONFIG_KEYS and not k.startswith("_"))
    if unknown:
        _refuse(where, f"unknown MambaConfig keys {unknown} (known: {sorted(MAMBA_CONFIG_KEYS)})")
    d_model, n_layer = int(raw["d_model"]), int(raw["n_layer"])
    if not raw.get("rms_norm", True):
        _refuse(where, "rms_norm=false (LayerNorm blocks: mean-centering and bias); megasleep blocks use RMSNorm")
    ssm = dict(raw.get("ssm_cfg") or {})
    attn = dict(raw.get("attn_cfg") or {})
    attn_idx = sorted(int(i) for i in (raw.get("attn_layer_idx") or []))
    bad_idx = [i for i in attn_idx if not 0 <= i < n_layer]
    if bad_idx:
        _refuse(where, f"attn_layer_idx {bad_idx} outside [0, {n_layer})")
    if n_layer > len(attn_idx):
        layer = ssm.get("layer", "Mamba1")
        if layer != "Mamba2":
            _refuse(where, f"ssm_cfg.layer={layer!r}: Mamba-1 (selective scan) layers have no megasleep mixer; "
                           "only Mamba2 layers can be imported")
    mamba2: dict[str, Any] = {}
    for k, v in ssm.items():
        if k in SSM_MAPPED:
            mamba2[k] = tuple(v) if k == "A_init_range" else v
        elif k in SSM_IGNORED:
            continue
        elif k in SSM_FIXED:
            default, why = SSM_FIXED[k]
            if k == "d_ssm" and v is not None and int(v) == int(ssm.get("expand", 2)) * d_model:
                continue
            if not _same(v, default):
                _refuse(where, f"ssm_cfg.{k}={v!r} ({why})")
        else:
            _refuse(where, f"unknown ssm_cfg key {k!r}")
    # mamba_ssm's Mamba2 defaults differ from megasleep's Mamba2Config defaults: write them all out
    m2_defaults = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256}
    for k, v in m2_defaults.items():
        mamba2.setdefault(k, v)
    attn_cfg: dict[str, Any] = {}
    if attn_idx:
        unknown = sorted(set(attn) - ATTN_KEYS)
        if unknown:
            _refuse(where, f"unknown attn_cfg keys {unknown}")
        if "num_heads" not in attn:
            _refuse(where, "attn_cfg.num_heads is missing")
        nh = int(attn["num_heads"])
        nkv = int(attn.get("num_heads_kv") or nh)
        hd = int(attn.get("head_dim") or d_model // nh)
        if not attn.get("causal", False):
            _refuse(where, "attn_cfg.causal is false (bidirectional attention); megasleep attention is causal")
        if int(attn.get("mlp_dim", 0)) > 0:
            _refuse(where, f"attn_cfg.mlp_dim={attn['mlp_dim']}: MHA's parallel gated MLP is not supported")
        rot = int(attn.get("rotary_emb_dim", 0))
        if attn.get("rotary_emb_interleaved", False):
            _refuse(where, "attn_cfg.rotary_emb_interleaved=true; megasleep uses the half-split (GPT-NeoX) rotary")
        scale = attn.get("softmax_scale")
        first = f"backbone.layers.{attn_idx[0]}.mixer"
        attn_cfg = {"n_heads": nh, "n_kv_heads": nkv, "head_dim": hd, "d_conv": int(attn.get("d_conv", 0)),
                    "rope_theta": float(attn.get("rotary_emb_base", 10000.0)),
                    "rotary_dim": None if rot == hd else rot, "softmax_scale": None if scale is None else float(scale),
                    "qkv_bias": f"{first}.in_proj.bias" in state, "out_bias": f"{first}.out_proj.bias" in state}
    # MLP: every block has the same GatedMLP (hidden from the tensors: GatedMLP rounds up to 128)
    d_int = int(raw.get("d_intermediate", 0) or 0)
    mlp: dict[str, Any] = {"A": 0.0, "M": 0.0}
    if d_int > 0:
        fc2 = state.get("backbone.layers.0.mlp.fc2.weight")
        hidden = int(fc2.shape[1]) if fc2 is not None else (d_int + 127) // 128 * 128
        mlp = {"A": hidden / d_model, "M": hidden / d_model, "multiple_of": hidden}
    emb = state.get("backbone.embedding.weight")
    vocab = int(emb.shape[0]) if emb is not None else int(raw["vocab_size"])
    pattern = "".join("A" if i in attn_idx else "M" for i in range(n_layer))
    data = {"name": "mamba_ssm-import", "vocab_size": vocab, "d_model": d_model, "pattern": pattern,
            "mamba2": mamba2, "mlp": mlp, "tie_embeddings": bool(raw.get("tie_embeddings", True)),
            "norm_eps": 1e-5}
    if attn_cfg:
        data["attn"] = attn_cfg
    data.update(overrides or {})
    from megasleep.config import validate

    cfg = validate(ModelConfig, data, where)
    facts = {"vocab_size": int(raw.get("vocab_size", vocab)), "padded_vocab_size": vocab,
             "residual_in_fp32": bool(raw.get("residual_in_fp32", True)), "attn_layer_idx": attn_idx}
    return cfg, facts


def convert_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], raw: dict,
                       where: str = "<mamba_ssm weights>") -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map mamba_ssm tensor names onto HybridLM names. Returns (new state, {source name: [target names]}).

    Every source tensor is consumed exactly once (biases only if all zero); leftovers are an error."""
    out: dict[str, torch.Tensor] = {}
    used: dict[str, list[str]] = {}

    def take(src: str) -> torch.Tensor:
        if src not in state:
            raise MambaImportError(f"{where}: tensor {src} is missing")
        used.setdefault(src, [])
        return state[src]

    def put(dst: str, t: torch.Tensor, src: str):
        used.setdefault(src, []).append(dst)
        out[dst] = t

    put("embed_tokens.weight", take("backbone.embedding.weight"), "backbone.embedding.weight")
    for i, letter in enumerate(cfg.pattern):
        src, dst = f"backbone.layers.{i}", f"layers.{i}"
        put(f"{dst}.norm.weight", take(f"{src}.norm.weight"), f"{src}.norm.weight")
        if letter == "M":
            for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                         "out_proj.weight"):
                put(f"{dst}.mixer.{name}", take(f"{src}.mixer.{name}"), f"{src}.mixer.{name}")
        else:
            a = cfg.attn
            hd = cfg.attn_head_dim
            nq, nkv = a.n_heads * hd, (a.n_kv_heads or a.n_heads) * hd
            w = take(f"{src}.mixer.in_proj.weight")
            if w.shape[0] != nq + 2 * nkv:
                _refuse(where, f"{src}.mixer.in_proj.weight has {w.shape[0]} rows, expected q+k+v = {nq + 2 * nkv}")
            q, k, v = torch.split(w, [nq, nkv, nkv], dim=0)
            for n, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                put(f"{dst}.mixer.{n}.weight", t.clone(), f"{src}.mixer.in_proj.weight")
            if a.qkv_bias:
                b = take(f"{src}.mixer.in_proj.bias")
                for n, t in zip(("q_proj", "k_proj", "v_proj"), torch.split(b, [nq, nkv, nkv])):
                    put(f"{dst}.mixer.{n}.bias", t.clone(), f"{src}.mixer.in_proj.bias")
            for n in ("weight", "bias") if a.out_bias else ("weight",):
                put(f"{dst}.mixer.o_proj.{n}", take(f"{src}.mixer.out_proj.{n}"), f"{src}.mixer.out_proj.{n}")
            if a.d_conv:  # MHA's conv over the concatenated [q | k | v] channels
                for n in ("weight", "bias"):
                    put(f"{dst}.mixer.qkv_conv1d.{n}", take(f"{src}.mixer.conv1d.{n}"), f"{src}.mixer.conv1d.{n}")
        if f"{src}.mlp.fc1.weight" in state:
            fc1 = take(f"{src}.mlp.fc1.weight")
            up, gate = fc1.chunk(2, dim=0)  # GatedMLP: y, gate = fc1(x).chunk(2); y * silu(gate)
            put(f"{dst}.mlp.up_proj.weight", up.clone(), f"{src}.mlp.fc1.weight")
            put(f"{dst}.mlp.gate_proj.weight", gate.clone(), f"{src}.mlp.fc1.weight")
            put(f"{dst}.mlp.down_proj.weight", take(f"{src}.mlp.fc2.weight"), f"{src}.mlp.fc2.weight")
            put(f"{dst}.mlp_norm.weight", take(f"{src}.norm2.weight"), f"{src}.norm2.weight")
            for b in ("fc1.bias", "fc2.bias"):
                if f"{src}.mlp.{b}" in state:
                    _refuse(where, f"{src}.mlp.{b}: GatedMLP with bias; megasleep's SwiGLU has none")
    put("norm_f.weight", take("backbone.norm_f.weight"), "backbone.norm_f.weight")
    if "lm_head.weight" in state:
        head = take("lm_head.weight")
        if cfg.tie_embeddings:
            if not torch.equal(head, out["embed_tokens.weight"]):
                _refuse(where, "tie_embeddings=true but lm_head.weight differs from backbone.embedding.weight")
            used["lm_head.weight"].append("(tied to embed_tokens.weight)")
        else:
            put("lm_head.weight", head, "lm_head.weight")
    elif not cfg.tie_embeddings:
        raise MambaImportError(f"{where}: tie_embeddings=false but lm_head.weight is missing")
    left = sorted(set(state) - set(used))
    if left:
        _refuse(where, f"{len(left)} tensor(s) have no megasleep counterpart: {left[:12]}")
    return out, used


def _layer_sort_key(name: str):
    m = re.match(r"backbone\.layers\.(\d+)\.(.*)", name)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if name.startswith("backbone.emb") else 2, 0, name)


def read_mamba_ssm_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a MambaLMHeadModel.save_pretrained directory (weights-only loading)."""
    p = Path(path)
    raw = read_json(p / CONFIG_NAME)
    state = load_weights(p)
    return raw, state


def convert(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Read and convert a mamba_ssm directory: (ModelConfig, HybridLM state dict, report)."""
    raw, state = read_mamba_ssm_dir(path)
    return MambaSSMAdapter().convert(raw, state, str(Path(path)), overrides)


def is_mamba_ssm_config(raw: dict) -> bool:
    return "n_layer" in raw and "d_model" in raw and ("ssm_cfg" in raw or "attn_layer_idx" in raw) \
        and "model_type" not in raw


class MambaSSMAdapter(Adapter):
    """``MambaLMHeadModel.save_pretrained`` directories (config.json without a model_type)."""

    name = "mamba_ssm"
    model_types = ("mamba_ssm",)

    @classmethod
    def matches(cls, raw: dict) -> bool:
        return is_mamba_ssm_config(raw)

    def convert(self, raw, state, where, overrides):
        cfg, facts = convert_config(raw, state, f"{where}/{CONFIG_NAME}", overrides)
        new, used = convert_state_dict(cfg, state, raw, where)
        return cfg, new, {"source_tensors": len(state),
                          "mapped": {k: used[k] for k in sorted(used, key=_layer_sort_key)}, **facts}


__all__ = ["MambaImportError", "MambaSSMAdapter", "convert", "convert_config", "convert_state_dict",
           "read_mamba_ssm_dir"]
