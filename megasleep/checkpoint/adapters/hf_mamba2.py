"""transformers' ``mamba2`` (Mamba2ForCausalLM), and the Mamba-2 mixer mapping the transformers hybrids
(bamba, nemotron_h, granitemoehybrid) share. Import only.

==============================================  ==========================================
transformers                                     megasleep HybridLM
==============================================  ==========================================
backbone.embeddings.weight                       embed_tokens.weight
backbone.layers.i.norm.weight                    layers.i.norm.weight
backbone.layers.i.mixer.{in_proj,conv1d,         layers.i.mixer.* (same names, shapes and
  dt_bias,A_log,D,norm,out_proj}                   in_proj order z | xBC | dt as mamba_ssm)
backbone.norm_f.weight                           norm_f.weight
lm_head.weight                                   lm_head.weight (absent when tied)
==============================================  ==========================================

``residual_in_fp32`` only matters below fp32. Settings megasleep's mixer does not have are refused by
name: ``use_bias``, ``use_conv_bias: false``, a ``time_step_limit`` that clamps, an activation other
than SiLU, ``num_heads * head_dim != expand * hidden_size``.
"""

from __future__ import annotations

import math
from typing import Any

from megasleep.checkpoint.adapters.base import Adapter, TensorMap, refuse
from megasleep.config import validate
from megasleep.models.config import ModelConfig

MAMBA2_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                  "out_proj.weight")


def _float(x) -> float:
    """transformers writes inf / nan into config.json as {"__float__": "Infinity"}."""
    return float(x["__float__"]) if isinstance(x, dict) and "__float__" in x else float(x)


def mamba2_settings(raw: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """Mamba2Config fields from a transformers config; ``prefix`` is how the family names them
    (``mamba_`` for bamba / nemotron_h / granitemoehybrid, nothing for mamba2)."""
    def get(key, default=None):
        return raw.get(prefix + key, raw.get(key, default))

    d = int(raw["hidden_size"])
    nh, hd = int(get("n_heads", get("num_heads"))), int(get("d_head", get("head_dim")))
    expand = int(get("expand", 2))
    d_inner = int(raw.get("mamba_d_inner") or 0) or expand * d
    if nh * hd != d_inner or d_inner % d:
        refuse(where, f"{prefix}num_heads*head_dim={nh * hd} must equal expand*hidden_size={expand * d} "
                      "(megasleep's Mamba2 runs the SSM on the whole inner width)")
    if get("proj_bias", raw.get("use_bias", False)):
        refuse(where, "Mamba-2 in/out projection biases (megasleep's Mamba2 has none)")
    if not get("conv_bias", raw.get("use_conv_bias", True)):
        refuse(where, "Mamba-2 conv without bias (megasleep's Mamba2 conv1d has one)")
    act = raw.get("mamba_hidden_act", raw.get("hidden_act", "silu")) if prefix else raw.get("hidden_act", "silu")
    if act != "silu":
        refuse(where, f"Mamba-2 activation {act!r} (megasleep's conv activation is SiLU)")
    lim = raw.get("time_step_limit") or get("dt_limit") or (0.0, math.inf)
    if tuple(_float(x) for x in lim) != (0.0, math.inf):
        refuse(where, f"time_step_limit={list(lim)} clamps dt; megasleep does not")
    eps = float(raw.get("layer_norm_epsilon", raw.get("rms_norm_eps", 1e-5)))
    return {"d_state": int(get("d_state", raw.get("state_size", 128))),
            "d_conv": int(get("d_conv", raw.get("conv_kernel", 4))), "expand": d_inner // d, "headdim": hd,
            "ngroups": int(get("n_groups", 1)), "chunk_size": int(get("chunk_size", 256)), "norm_eps": eps}


def move_mamba2(m: TensorMap, src: str, dst: str) -> None:
    for name in MAMBA2_TENSORS:
        m.move(f"{src}.{name}", f"{dst}.{name}")


def move_mixer(m: TensorMap, letter: str, src: str, dst: str) -> None:
    """A Mamba-2 (``M``) or attention mixer at ``src``: q/k/v/o projections, and their biases if stored."""
    if letter == "M":
        move_mamba2(m, src, dst)
        return
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for kind in ("weight", "bias"):
            if kind == "weight" or m.has(f"{src}.{p}.{kind}"):
                m.move(f"{src}.{p}.{kind}", f"{dst}.{p}.{kind}")


def move_head(m: TensorMap, cfg: ModelConfig, embed: str, norm_f: str) -> None:
    m.move(embed, "embed_tokens.weight")
    m.move(norm_f, "norm_f.weight")
    if m.has("lm_head.weight"):
        if cfg.tie_embeddings:
            m.note("lm_head.weight", "(tied to embed_tokens.weight)")
        else:
            m.move("lm_head.weight", "lm_head.weight")


class HFMamba2Adapter(Adapter):
    name = "transformers-mamba2"
    model_types = ("mamba2",)

    def convert(self, raw, state, where, overrides):
        d, n = int(raw["hidden_size"]), int(raw["num_hidden_layers"])
        data = {"name": "mamba2-import", "vocab_size": int(raw["vocab_size"]), "d_model": d, "pattern": "M" * n,
                "mamba2": mamba2_settings(raw, where), "mlp": {"M": 0.0},
                "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "norm_eps": float(raw.get("layer_norm_epsilon", 1e-5)), **overrides}
        cfg = validate(ModelConfig, data, f"{where}/config.json")
        m = TensorMap(state, where)
        for i in range(n):
            m.move(f"backbone.layers.{i}.norm.weight", f"layers.{i}.norm.weight")
            move_mamba2(m, f"backbone.layers.{i}.mixer", f"layers.{i}.mixer")
        move_head(m, cfg, "backbone.embeddings.weight", "backbone.norm_f.weight")
        out, used = m.finish()
        return cfg, out, {"source_tensors": len(state), "mapped": used, "model_type": "mamba2",
                          "residual_in_fp32": bool(raw.get("residual_in_fp32", True))}


__all__ = ["HFMamba2Adapter", "mamba2_settings", "move_head", "move_mamba2", "move_mixer"]
