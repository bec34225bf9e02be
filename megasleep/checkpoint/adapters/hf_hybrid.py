"""transformers' Mamba-2 + attention hybrids: ``bamba`` and ``granitemoehybrid`` in its dense form.
Import only. Each layer is a pre-norm mixer (Mamba-2 or attention) followed by a pre-norm SwiGLU MLP,
which is exactly a megasleep block (``M`` or ``A``).

=================================================  =========================================
transformers                                        megasleep HybridLM
=================================================  =========================================
model.embed_tokens.weight                           embed_tokens.weight
model.layers.i.input_layernorm.weight               layers.i.norm.weight
model.layers.i.mamba.*       (Mamba-2 layers)       layers.i.mixer.* (same names as mamba_ssm)
model.layers.i.self_attn.{q,k,v,o}_proj.weight      layers.i.mixer.{q,k,v,o}_proj.weight
model.layers.i.pre_ff_layernorm.weight (bamba)       layers.i.mlp_norm.weight
  / post_attention_layernorm.weight (granite)
bamba:   model.layers.i.feed_forward.{gate,up,down}_proj.weight -> layers.i.mlp.*
granite: model.layers.i.shared_mlp.input_linear.weight rows [:h] -> gate_proj, [h:] -> up_proj;
         model.layers.i.shared_mlp.output_linear.weight          -> down_proj
model.final_layernorm.weight (bamba) / model.norm.weight (granite)  norm_f.weight
lm_head.weight                                      lm_head.weight (absent when tied)
=================================================  =========================================

Bamba's attention rotates the first ``partial_rotary_factor * head_dim`` dims (megasleep's
``attn.rotary_dim``); granite's has no positions unless ``position_embedding_type: rope``
(``rotary_dim = 0``). Granite's ``attention_multiplier`` is the softmax scale (``attn.softmax_scale``); its other
multipliers (embedding, residual, logits scaling) and its mixture of experts are refused unless they
are the identity / absent.
"""

from __future__ import annotations

import torch

from megasleep.checkpoint.adapters.base import Adapter, TensorMap, refuse
from megasleep.checkpoint.adapters.hf_attention import attention_settings
from megasleep.checkpoint.adapters.hf_mamba2 import mamba2_settings, move_head, move_mixer
from megasleep.config import validate
from megasleep.models.config import ModelConfig


def _layer_letters(raw: dict, where: str) -> str:
    n = int(raw["num_hidden_layers"])
    if raw.get("layer_types") or raw.get("layers_block_type"):
        types = raw.get("layer_types") or raw.get("layers_block_type")
        table = {"mamba": "M", "linear_attention": "M", "attention": "A", "full_attention": "A"}
        bad = sorted({t for t in types if t not in table})
        if bad or len(types) != n:
            refuse(where, f"layer_types {bad or types}: only Mamba-2 and attention layers map onto blocks")
        return "".join(table[t] for t in types)
    attn = set(raw.get("attn_layer_indices") or [])
    return "".join("A" if i in attn else "M" for i in range(n))


class HFHybridAdapter(Adapter):
    name = "transformers-hybrid"
    model_types = ("bamba", "granitemoehybrid")

    def convert(self, raw, state, where, overrides):
        mt = raw["model_type"]
        d = int(raw["hidden_size"])
        pattern = _layer_letters(raw, where)
        if raw.get("hidden_act", "silu") != "silu":
            refuse(where, f"hidden_act={raw['hidden_act']!r} (megasleep's MLP here is SwiGLU with SiLU)")
        if raw.get("mlp_bias") or raw.get("attention_bias"):
            refuse(where, "attention / MLP biases (this family maps onto bias-free blocks)")
        attn = attention_settings(raw, where)
        if mt == "granitemoehybrid":
            for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
                if float(raw.get(key, 1.0)) != 1.0:
                    refuse(where, f"{key}={raw[key]} (megasleep blocks have no such scale)")
            attn["softmax_scale"] = float(raw.get("attention_multiplier", 1.0))
            if int(raw.get("num_local_experts") or 0) > 0:
                refuse(where, f"num_local_experts={raw['num_local_experts']}: the mixture-of-experts form is not "
                              "supported (the dense form, num_local_experts=0, is)")
            if raw.get("position_embedding_type") != "rope":
                attn["rotary_dim"] = 0
            hidden = int(raw["shared_intermediate_size"])
        else:
            hidden = int(raw["intermediate_size"])
        data = {"name": f"{mt}-import", "vocab_size": int(raw["vocab_size"]), "d_model": d, "pattern": pattern,
                "attn": attn, "mamba2": mamba2_settings(raw, where, prefix="mamba_"),
                "mlp": {"A": hidden / d, "M": hidden / d, "multiple_of": 1},
                "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "norm_eps": float(raw.get("rms_norm_eps", 1e-5)), **overrides}
        cfg = validate(ModelConfig, data, f"{where}/config.json")
        m = TensorMap(state, where)
        for i, letter in enumerate(pattern):
            s, t = f"model.layers.{i}", f"layers.{i}"
            m.move(f"{s}.input_layernorm.weight", f"{t}.norm.weight")
            pre_ff = "pre_ff_layernorm" if mt == "bamba" else "post_attention_layernorm"
            m.move(f"{s}.{pre_ff}.weight", f"{t}.mlp_norm.weight")
            move_mixer(m, letter, f"{s}.mamba" if letter == "M" else f"{s}.self_attn", f"{t}.mixer")
            if mt == "granitemoehybrid":
                src = f"{s}.shared_mlp.input_linear.weight"
                gate, up = torch.chunk(m.take(src), 2, dim=0)  # GraniteMoeHybridMLP: act(gate) * up, gate first
                m.put(f"{t}.mlp.gate_proj.weight", gate.clone(), src)
                m.put(f"{t}.mlp.up_proj.weight", up.clone(), src)
                m.move(f"{s}.shared_mlp.output_linear.weight", f"{t}.mlp.down_proj.weight")
            else:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    m.move(f"{s}.feed_forward.{p}.weight", f"{t}.mlp.{p}.weight")
        final = "model.final_layernorm.weight" if mt == "bamba" else "model.norm.weight"
        move_head(m, cfg, "model.embed_tokens.weight", final)
        out, used = m.finish()
        return cfg, out, {"source_tensors": len(state), "mapped": used, "model_type": mt}


__all__ = ["HFHybridAdapter"]
