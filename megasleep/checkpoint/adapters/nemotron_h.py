"""transformers' ``nemotron_h`` (Nemotron-H: Mamba-2, attention and MLP as separate layers). Import only.

Each layer is ``x + mixer(RMSNorm(x))`` with a mixer that is Mamba-2 (``M``), attention (``*``, no
positional encoding) or a ReLU² MLP (``-``). A megasleep block is a mixer followed by an optional MLP,
so a Mamba-2 / attention layer and the MLP layer right after it become one block; a mixer layer with
no MLP after it becomes a block without MLP (``mlp.blocks``); an MLP layer that follows no mixer layer
(or a mixture-of-experts layer) is refused.

==============================================  ==========================================
transformers (``backbone.`` or ``model.`` prefix)  megasleep HybridLM
==============================================  ==========================================
model.embeddings.weight                          embed_tokens.weight
model.layers.i.norm.weight (Mamba-2 / attn)      layers.b.norm.weight
model.layers.i.mixer.* (Mamba-2)                 layers.b.mixer.* (mamba_ssm names)
model.layers.i.mixer.{q,k,v,o}_proj.weight       layers.b.mixer.{q,k,v,o}_proj.weight
model.layers.i+1.norm.weight (MLP layer)         layers.b.mlp_norm.weight
model.layers.i+1.mixer.{up,down}_proj.weight     layers.b.mlp.{up,down}_proj.weight (ReLU²)
model.norm_f.weight                              norm_f.weight
lm_head.weight                                   lm_head.weight (absent when tied)
==============================================  ==========================================
"""

from __future__ import annotations

from megasleep.checkpoint.adapters.base import Adapter, TensorMap, refuse
from megasleep.checkpoint.adapters.hf_mamba2 import mamba2_settings, move_head, move_mixer
from megasleep.config import validate
from megasleep.models.config import ModelConfig

LETTERS = {"mamba": "M", "linear_attention": "M", "attention": "A", "full_attention": "A", "mlp": "-"}


def group_layers(types: list[str], where: str) -> list[tuple[str, int, int | None]]:
    """[(letter, mixer layer, MLP layer or None)] of the megasleep blocks."""
    bad = sorted({t for t in types if t not in LETTERS})
    if bad:
        refuse(where, f"layers_block_type {bad}: only Mamba-2, attention and dense MLP layers map onto blocks")
    blocks: list[tuple[str, int, int | None]] = []
    for i, t in enumerate(types):
        letter = LETTERS[t]
        if letter != "-":
            blocks.append((letter, i, None))
        elif blocks and blocks[-1][2] is None and blocks[-1][1] == i - 1:
            blocks[-1] = (blocks[-1][0], i - 1, i)
        else:
            refuse(where, f"layer {i} is an MLP layer that follows no Mamba-2 / attention layer")
    return blocks


class NemotronHAdapter(Adapter):
    name = "transformers-nemotron_h"
    model_types = ("nemotron_h",)

    def convert(self, raw, state, where, overrides):
        d = int(raw["hidden_size"])
        types = raw.get("layers_block_type") or raw.get("layer_types")
        if not types:
            refuse(where, "no layers_block_type in config.json")
        blocks = group_layers(list(types), where)
        act = raw.get("mlp_hidden_act", "relu2")
        if act != "relu2":
            refuse(where, f"mlp_hidden_act={act!r} (megasleep's MLPs are SwiGLU or ReLU²)")
        if raw.get("mlp_bias") or raw.get("attention_bias"):
            refuse(where, "attention / MLP biases (this family maps onto bias-free blocks)")
        nh = int(raw["num_attention_heads"])
        attn = {"n_heads": nh, "n_kv_heads": int(raw.get("num_key_value_heads") or nh),
                "head_dim": int(raw.get("head_dim") or d // nh), "rotary_dim": 0}  # no positional encoding
        mamba = mamba2_settings({**raw, "n_heads": raw.get("mamba_num_heads"), "head_dim": raw.get("mamba_head_dim"),
                                 "d_state": raw.get("ssm_state_size"), "hidden_act": raw.get("mamba_hidden_act",
                                                                                             "silu")}, where)
        hidden = int(raw["intermediate_size"])
        data = {"name": "nemotron_h-import", "vocab_size": int(raw["vocab_size"]), "d_model": d,
                "pattern": "".join(b[0] for b in blocks), "attn": attn, "mamba2": mamba,
                "mlp": {"A": hidden / d, "M": hidden / d, "multiple_of": 1, "activation": "relu2",
                        "blocks": "".join("0" if b[2] is None else "1" for b in blocks)},
                "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "norm_eps": float(raw.get("layer_norm_epsilon", 1e-5)), **overrides}
        cfg = validate(ModelConfig, data, f"{where}/config.json")
        m = TensorMap(state, where)
        root = "backbone" if "backbone.embeddings.weight" in state else "model"  # released files: backbone.
        for b, (letter, i, j) in enumerate(blocks):
            s, t = f"{root}.layers.{i}", f"layers.{b}"
            m.move(f"{s}.norm.weight", f"{t}.norm.weight")
            move_mixer(m, letter, f"{s}.mixer", f"{t}.mixer")
            if j is not None:
                m.move(f"{root}.layers.{j}.norm.weight", f"{t}.mlp_norm.weight")
                for p in ("up_proj", "down_proj"):
                    m.move(f"{root}.layers.{j}.mixer.{p}.weight", f"{t}.mlp.{p}.weight")
        move_head(m, cfg, f"{root}.embeddings.weight", f"{root}.norm_f.weight")
        out, used = m.finish()
        return cfg, out, {"source_tensors": len(state), "mapped": used, "model_type": "nemotron_h",
                          "blocks": [{"letter": b[0], "mixer_layer": b[1], "mlp_layer": b[2]} for b in blocks]}


__all__ = ["NemotronHAdapter", "group_layers"]
