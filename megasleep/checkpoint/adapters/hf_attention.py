"""transformers' attention-only decoders, ``llama`` and ``qwen2`` (the starting point of a retrofit):
import and export. Every layer becomes an ``A`` block with its SwiGLU MLP.

==============================================  ==========================================
transformers (LlamaForCausalLM / Qwen2...)       megasleep HybridLM
==============================================  ==========================================
model.embed_tokens.weight                        embed_tokens.weight
model.layers.i.input_layernorm.weight            layers.i.norm.weight
model.layers.i.self_attn.{q,k,v,o}_proj.*        layers.i.mixer.{q,k,v,o}_proj.* (qkv bias: Qwen2)
model.layers.i.post_attention_layernorm.weight   layers.i.mlp_norm.weight
model.layers.i.mlp.{gate,up,down}_proj.weight    layers.i.mlp.{gate,up,down}_proj.weight
model.norm.weight                                norm_f.weight
lm_head.weight                                   lm_head.weight (absent when tied)
==============================================  ==========================================

Both use RMSNorm pre-norm blocks, half-split RoPE at absolute positions and softmax scale
``head_dim**-0.5``, so with ``window >= T`` and ``N = 1`` megasleep computes the same function.
Settings that would change it are refused by name: rope scaling, sliding-window layers, MLP biases,
an activation other than SiLU, attention bias on Llama's output projection only where megasleep has it.
"""

from __future__ import annotations

from typing import Any

import torch

from megasleep.checkpoint.adapters.base import Adapter, State, TensorMap, refuse
from megasleep.checkpoint.adapters.hf_mamba2 import move_mixer
from megasleep.config import validate
from megasleep.models.config import ModelConfig


def _rope_theta(raw: dict, where: str) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        refuse(where, f"rope_parameters.rope_type={kind!r} (megasleep's RoPE has no scaling)")
    return float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))


def attention_settings(raw: dict, where: str) -> dict[str, Any]:
    """AttnConfig fields of a transformers decoder config (shared by the hybrid families)."""
    d, nh = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    hd = int(raw.get("head_dim") or raw.get("attention_head_dim") or d // nh)
    rope = raw.get("rope_parameters") or {}
    factor = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    return {"n_heads": nh, "n_kv_heads": int(raw.get("num_key_value_heads") or nh), "head_dim": hd,
            "rope_theta": _rope_theta(raw, where), "rotary_dim": None if factor == 1.0 else int(hd * factor)}


class HFAttentionAdapter(Adapter):
    name = "transformers-llama"
    model_types = ("llama", "qwen2")
    can_export = True

    def model_config(self, raw: dict, where: str, overrides: dict | None = None) -> ModelConfig:
        """The ModelConfig of a llama / qwen2 config.json (no tensors needed)."""
        mt = raw["model_type"]
        d, n = int(raw["hidden_size"]), int(raw["num_hidden_layers"])
        if raw.get("hidden_act", "silu") != "silu":
            refuse(where, f"hidden_act={raw['hidden_act']!r} (megasleep's MLP here is SwiGLU with SiLU)")
        if raw.get("mlp_bias"):
            refuse(where, "mlp_bias=true (megasleep's SwiGLU has no biases)")
        if mt == "qwen2" and (raw.get("use_sliding_window") or any(
                t != "full_attention" for t in raw.get("layer_types") or [])):
            refuse(where, "sliding-window attention layers (use_sliding_window / layer_types); megasleep's "
                          "window is the sleep window L")
        bias = bool(raw.get("attention_bias", False)) or mt == "qwen2"
        attn = {**attention_settings(raw, where), "qkv_bias": bias, "out_bias": bias and mt != "qwen2"}
        hidden = int(raw["intermediate_size"])
        data = {"name": f"{mt}-import", "vocab_size": int(raw["vocab_size"]), "d_model": d, "pattern": "A" * n,
                "attn": attn, "mlp": {"A": hidden / d, "multiple_of": 1},
                "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "norm_eps": float(raw.get("rms_norm_eps", 1e-6)), **(overrides or {})}
        return validate(ModelConfig, data, f"{where}/config.json")

    def convert(self, raw, state, where, overrides):
        cfg = self.model_config(raw, where, overrides)
        n, mt = len(cfg.pattern), raw["model_type"]
        m = TensorMap(state, where)
        m.move("model.embed_tokens.weight", "embed_tokens.weight")
        for i in range(n):
            s, t = f"model.layers.{i}", f"layers.{i}"
            m.move(f"{s}.input_layernorm.weight", f"{t}.norm.weight")
            m.move(f"{s}.post_attention_layernorm.weight", f"{t}.mlp_norm.weight")
            move_mixer(m, "A", f"{s}.self_attn", f"{t}.mixer")
            for p in ("gate_proj", "up_proj", "down_proj"):
                m.move(f"{s}.mlp.{p}.weight", f"{t}.mlp.{p}.weight")
        m.move("model.norm.weight", "norm_f.weight")
        if m.has("lm_head.weight"):
            if cfg.tie_embeddings:
                m.note("lm_head.weight", "(tied to embed_tokens.weight)")
            else:
                m.move("lm_head.weight", "lm_head.weight")
        out, used = m.finish()
        return cfg, out, {"source_tensors": len(state), "mapped": used, "model_type": mt}

    def export(self, cfg: ModelConfig, state: State, where: str) -> tuple[dict, State]:
        """A megasleep model whose blocks are all attention + SwiGLU -> a LlamaForCausalLM directory's
        config and tensors (Qwen2 when it has q/k/v biases only)."""
        from megasleep.models.mlp import mlp_hidden

        a = cfg.attn
        if set(cfg.pattern) != {"A"} or cfg.mlp.activation != "swiglu" or \
                any(mlp_hidden(cfg, "A", i) == 0 for i in range(len(cfg.pattern))):
            refuse(where, f"pattern {cfg.pattern!r}: only attention + SwiGLU blocks export as llama / qwen2")
        if a.d_conv or a.rotary_dim is not None or a.softmax_scale is not None:
            refuse(where, "attn.d_conv / rotary_dim / softmax_scale have no llama / qwen2 equivalent")
        if a.out_bias and not a.qkv_bias:
            refuse(where, "attn.out_bias without attn.qkv_bias has no llama / qwen2 equivalent")
        qwen = a.qkv_bias and not a.out_bias
        raw = {"model_type": "qwen2" if qwen else "llama",
               "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
               "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
               "intermediate_size": mlp_hidden(cfg, "A"), "num_hidden_layers": len(cfg.pattern),
               "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads or a.n_heads,
               "head_dim": cfg.attn_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
               "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
               "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": 1 << 20}
        if not qwen:
            raw["attention_bias"] = a.qkv_bias
        out: State = {"model.embed_tokens.weight": state["embed_tokens.weight"],
                      "model.norm.weight": state["norm_f.weight"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        for i in range(len(cfg.pattern)):
            s, t = f"model.layers.{i}", f"layers.{i}"
            out[f"{s}.input_layernorm.weight"] = state[f"{t}.norm.weight"]
            out[f"{s}.post_attention_layernorm.weight"] = state[f"{t}.mlp_norm.weight"]
            for k, v in state.items():
                if k.startswith(f"{t}.mixer."):
                    out[f"{s}.self_attn.{k[len(t) + 7:]}"] = v
                elif k.startswith(f"{t}.mlp."):
                    out[f"{s}.mlp.{k[len(t) + 5:]}"] = v
        return raw, {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


__all__ = ["HFAttentionAdapter", "attention_settings"]
