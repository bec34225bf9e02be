"""transformers' ``olmo_hybrid`` (OLMo-Hybrid: Gated DeltaNet + attention layers): import and export.

Each ``linear_attention`` layer is a pre-norm Gated DeltaNet + SwiGLU layer, a megasleep ``G`` block. Each
``full_attention`` layer is OLMo's post-norm attention + SwiGLU layer (``x + norm(attn(x))``, then
``x + norm(mlp(x))``, q and k RMS-normalised over their whole projected width), an ``A`` block with
``post_norm: "A"`` and ``attn.qk_norm``. The GDN layer's beta is ``2 sigmoid(b)`` with
``linear_allow_neg_eigval`` (``gdn.allow_neg_eigval``) and its gated output norm has eps 1e-5 whatever
``rms_norm_eps`` is (``gdn.norm_eps``).

=====================================================  =======================================
OLMo-Hybrid files (what save_pretrained writes)         megasleep HybridLM
=====================================================  =======================================
model.embed_tokens.weight                               embed_tokens.weight
linear_attention layer i:
  model.layers.i.attention_layer_norm.weight            layers.i.norm.weight
  model.layers.i.feedforward_layer_norm.weight          layers.i.mlp_norm.weight
  model.layers.i.linear_attn.{q,k,v,a,b,g,o}_proj       layers.i.mixer.{q,k,v,a,b,g,o}_proj
  model.layers.i.linear_attn.{A_log,dt_bias}            layers.i.mixer.{A_log,dt_bias}
  model.layers.i.linear_attn.{q,k,v}_conv1d.weight      layers.i.mixer.{q,k,v}_conv1d.weight
  model.layers.i.linear_attn.o_norm.weight              layers.i.mixer.o_norm.weight
full_attention layer i:
  model.layers.i.self_attn.{q,k,v,o}_proj.*             layers.i.mixer.{q,k,v,o}_proj.*
  model.layers.i.self_attn.{q,k}_norm.weight            layers.i.mixer.{q,k}_norm.weight
  model.layers.i.feedforward_layer_norm.weight          layers.i.norm.weight     (on the attention output)
  model.layers.i.post_feedforward_layernorm.weight      layers.i.mlp_norm.weight (on the MLP output)
model.layers.i.mlp.{gate,up,down}_proj.weight           layers.i.mlp.{gate,up,down}_proj.weight
model.norm.weight                                       norm_f.weight
lm_head.weight                                          lm_head.weight (absent when tied)
=====================================================  =======================================

transformers renames on load (its conversion mapping): ``attention_layer_norm`` -> ``input_layernorm``,
``feedforward_layer_norm`` -> ``post_attention_layernorm``, and concatenates the three convs into one
``linear_attn.conv1d`` over [q | k | v] channels. Files in those in-memory names are read too (the fused
conv split by channel: a depthwise conv, so the same maths); export writes the file names.

RoPE covers the whole head; ``rope_parameters.rope_theta: null`` (the released checkpoints) is NoPE
(``attn.rotary_dim: 0``). Refused by name: key and value head counts that differ in the GDN layers
(grouped values), an activation other than SiLU, rope scaling, other layer types.
"""

from __future__ import annotations

import torch

from megasleep.checkpoint.adapters.base import Adapter, State, TensorMap, check_shapes, refuse, source_file
from megasleep.checkpoint.adapters.hf_attention import attention_settings
from megasleep.checkpoint.adapters.hf_mamba2 import move_head, move_mixer
from megasleep.config import validate
from megasleep.models.config import ModelConfig

LETTERS = {"linear_attention": "G", "full_attention": "A"}
GDN_PROJ = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
FF_NORM = ("feedforward_layer_norm", "post_attention_layernorm")  # (file name, transformers' in-memory name)
O_NORM_EPS = 1e-5  # OlmoHybridGatedDeltaNet's gated output norm: FLA's default, not rms_norm_eps


def _pattern(raw: dict, where: str) -> str:
    n = int(raw["num_hidden_layers"])
    types = list(raw.get("layer_types") or [])
    bad = sorted({t for t in types if t not in LETTERS})
    if bad or len(types) != n:
        refuse(where, f"layer_types {bad or types}: expected one of {sorted(LETTERS)} per layer "
                      f"({n} layers)")
    return "".join(LETTERS[t] for t in types)


def _attention(raw: dict, where: str) -> dict:
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and rope["rope_theta"] is None:
        # transformers builds no rotary embedding at all (NoPE), as in the released checkpoints
        attn = attention_settings({**raw, "rope_parameters": None}, where)
        attn["rotary_dim"] = 0
    else:
        attn = attention_settings(raw, where)
        if attn["rotary_dim"] is not None:
            refuse(where, "partial_rotary_factor (OlmoHybridAttention rotates the whole head)")
    bias = bool(raw.get("attention_bias", False))
    return {**attn, "qkv_bias": bias, "out_bias": bias, "qk_norm": True}


def _gdn(raw: dict, where: str) -> dict:
    # absent keys take OlmoHybridConfig's defaults
    nk = int(raw.get("linear_num_key_heads") or raw["num_attention_heads"])
    nv = int(raw.get("linear_num_value_heads") or raw["num_attention_heads"])
    if nk != nv:
        refuse(where, f"linear_num_key_heads={nk} != linear_num_value_heads={nv} (grouped values; megasleep's "
                      "GatedDeltaNet has one key head per value head)")
    dk = int(raw.get("linear_key_head_dim") or int(0.75 * int(raw["hidden_size"]) / nk))
    dv = int(raw.get("linear_value_head_dim") or 2 * dk)
    return {"n_heads": nk, "head_dim": dk, "expand_v": dv / dk, "d_conv": int(raw.get("linear_conv_kernel_dim", 4)),
            "allow_neg_eigval": bool(raw.get("linear_allow_neg_eigval", True)), "norm_eps": O_NORM_EPS,
            "l2norm": "fla"}


def _move_either(m: TensorMap, s: str, names: tuple[str, str], dst: str) -> None:
    """The tensor under its file name, or under transformers' in-memory name."""
    file_name, memory_name = (f"{s}.{n}.weight" for n in names)
    m.move(memory_name if m.has(memory_name) and not m.has(file_name) else file_name, dst)


def _move_convs(m: TensorMap, cfg: ModelConfig, src: str, dst: str, where: str) -> None:
    """The GDN's q/k/v convs. transformers reads them as one conv over [q | k | v] channels (the three
    stored tensors concatenated, or its fused ``conv1d``) and splits that by [key | key | value] width; so
    do we. (Its save_pretrained writes the three as equal thirds, which differ from q/k/v when the value
    width is not the key width; concatenating undoes that too.)"""
    names = ("q_conv1d", "k_conv1d", "v_conv1d")
    parts = [f"{src}.conv1d.weight"] if m.has(f"{src}.conv1d.weight") else [f"{src}.{n}.weight" for n in names]
    stored = [m.take(p) for p in parts]
    key, value = cfg.gdn.n_heads * cfg.gdn.head_dim, cfg.gdn.n_heads * int(cfg.gdn.head_dim * cfg.gdn.expand_v)
    want = (2 * key + value, 1, cfg.gdn.d_conv)
    for p, w in zip(parts, stored):
        if w.dim() != 3 or tuple(w.shape[1:]) != want[1:]:
            refuse(f"{where}/{source_file(where, p)}", f"tensor {p} has shape {tuple(w.shape)}, config.json "
                                                       f"implies (channels, {want[1]}, {want[2]})")
    w = torch.cat(stored, 0)
    if tuple(w.shape) != want:
        what = (f"tensor {parts[0]} has shape {tuple(w.shape)}" if len(parts) == 1 else
                f"tensors {parts} hold {w.shape[0]} conv channels together")
        refuse(f"{where}/{source_file(where, parts[0])}", f"{what}, config.json implies {want} (q + k + v)")
    bounds = torch.tensor([0, *(x.shape[0] for x in stored)]).cumsum(0).tolist()
    start = 0
    for name, width in zip(names, (key, key, value)):
        # record every stored tensor whose channels this conv takes
        for p, lo, hi in zip(parts, bounds, bounds[1:]):
            if lo < start + width and hi > start:
                m.put(f"{dst}.{name}.weight", w[start:start + width].clone(), p)
        start += width


class OlmoHybridAdapter(Adapter):
    name = "transformers-olmo_hybrid"
    model_types = ("olmo_hybrid",)
    can_export = True

    def model_config(self, raw: dict, where: str, overrides: dict | None = None) -> ModelConfig:
        if raw.get("hidden_act", "silu") != "silu":
            refuse(where, f"hidden_act={raw['hidden_act']!r} (megasleep's MLP and GDN conv use SiLU)")
        d = int(raw["hidden_size"])
        data = {"name": "olmo_hybrid-import", "vocab_size": int(raw["vocab_size"]), "d_model": d,
                "pattern": _pattern(raw, where), "post_norm": "A", "attn": _attention(raw, where),
                "gdn": _gdn(raw, where), "mlp": {"A": int(raw["intermediate_size"]) / d,
                                                 "G": int(raw["intermediate_size"]) / d, "multiple_of": 1},
                "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "norm_eps": float(raw.get("rms_norm_eps", 1e-6)), **(overrides or {})}
        return validate(ModelConfig, data, f"{where}/config.json")

    def convert(self, raw, state, where, overrides):
        cfg = self.model_config(raw, where, overrides)
        m = TensorMap(state, where)
        for i, letter in enumerate(cfg.pattern):
            s, t = f"model.layers.{i}", f"layers.{i}"
            if letter == "G":
                _move_either(m, s, ("attention_layer_norm", "input_layernorm"), f"{t}.norm.weight")
                _move_either(m, s, FF_NORM, f"{t}.mlp_norm.weight")
                for name in (*(f"{p}.weight" for p in GDN_PROJ), "A_log", "dt_bias", "o_norm.weight"):
                    m.move(f"{s}.linear_attn.{name}", f"{t}.mixer.{name}")
                _move_convs(m, cfg, f"{s}.linear_attn", f"{t}.mixer", where)
            else:
                _move_either(m, s, FF_NORM, f"{t}.norm.weight")
                m.move(f"{s}.post_feedforward_layernorm.weight", f"{t}.mlp_norm.weight")
                move_mixer(m, "A", f"{s}.self_attn", f"{t}.mixer")
                for name in ("q_norm", "k_norm"):
                    m.move(f"{s}.self_attn.{name}.weight", f"{t}.mixer.{name}.weight")
            for p in MLP_PROJ:
                m.move(f"{s}.mlp.{p}.weight", f"{t}.mlp.{p}.weight")
        move_head(m, cfg, "model.embed_tokens.weight", "model.norm.weight")
        out, used = m.finish()
        check_shapes(cfg, out, used, where)
        return cfg, out, {"source_tensors": len(state), "mapped": used, "model_type": "olmo_hybrid"}

    def export(self, cfg: ModelConfig, state: State, where: str) -> tuple[dict, State]:
        """The inverse of ``convert``: a megasleep model of OLMo-Hybrid's shape -> OlmoHybridForCausalLM's
        config.json and tensors."""
        from megasleep.models.mlp import mlp_hidden

        a, g, n = cfg.attn, cfg.gdn, len(cfg.pattern)
        hidden = {mlp_hidden(cfg, letter, i) for i, letter in enumerate(cfg.pattern)}
        why = [msg for bad, msg in (
            (set(cfg.pattern) != {"A", "G"}, f"pattern {cfg.pattern!r} needs both and only A and G blocks"),
            (cfg.post_norm != "A", f"post_norm={cfg.post_norm!r} (OLMo-Hybrid: post-norm A, pre-norm G)"),
            (not a.qk_norm, "attn.qk_norm=false"),
            (a.qkv_bias != a.out_bias, "attn.qkv_bias != attn.out_bias (one attention_bias)"),
            (a.d_conv or a.softmax_scale is not None, "attn.d_conv / softmax_scale"),
            (a.rotary_dim not in (None, 0), f"attn.rotary_dim={a.rotary_dim} (whole head or NoPE only)"),
            (len(hidden) != 1 or 0 in hidden or cfg.mlp.activation != "swiglu",
             "every block needs the same SwiGLU MLP"),
            ((g.norm_eps or cfg.norm_eps) != O_NORM_EPS, f"gdn.norm_eps must be {O_NORM_EPS}"),
            (g.l2norm != "fla", "gdn.l2norm must be 'fla'"),
        ) if bad]
        if why:
            refuse(where, "no olmo_hybrid equivalent: " + "; ".join(why))
        dv = int(g.head_dim * g.expand_v)
        theta = None if a.rotary_dim == 0 else a.rope_theta
        raw = {"model_type": "olmo_hybrid", "architectures": ["OlmoHybridForCausalLM"],
               "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": hidden.pop(),
               "num_hidden_layers": n, "num_attention_heads": a.n_heads,
               "num_key_value_heads": a.n_kv_heads or a.n_heads, "hidden_act": "silu",
               "rms_norm_eps": cfg.norm_eps, "attention_bias": a.qkv_bias,
               "rope_parameters": {"rope_type": "default", "rope_theta": theta},
               "layer_types": [{v: k for k, v in LETTERS.items()}[c] for c in cfg.pattern],
               "linear_num_key_heads": g.n_heads, "linear_num_value_heads": g.n_heads,
               "linear_key_head_dim": g.head_dim, "linear_value_head_dim": dv,
               "linear_conv_kernel_dim": g.d_conv, "linear_allow_neg_eigval": g.allow_neg_eigval,
               "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": None, "eos_token_id": None}
        if cfg.attn_head_dim != cfg.d_model // a.n_heads:
            raw["head_dim"] = cfg.attn_head_dim
        out: State = {"model.embed_tokens.weight": state["embed_tokens.weight"],
                      "model.norm.weight": state["norm_f.weight"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        for i, letter in enumerate(cfg.pattern):
            s, t = f"model.layers.{i}", f"layers.{i}"
            if letter == "G":
                out[f"{s}.attention_layer_norm.weight"] = state[f"{t}.norm.weight"]
                out[f"{s}.feedforward_layer_norm.weight"] = state[f"{t}.mlp_norm.weight"]
                for name in (*(f"{p}.weight" for p in GDN_PROJ), "A_log", "dt_bias", "o_norm.weight",
                             "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
                    out[f"{s}.linear_attn.{name}"] = state[f"{t}.mixer.{name}"]
            else:
                out[f"{s}.feedforward_layer_norm.weight"] = state[f"{t}.norm.weight"]
                out[f"{s}.post_feedforward_layernorm.weight"] = state[f"{t}.mlp_norm.weight"]
                for k, v in state.items():
                    if k.startswith(f"{t}.mixer."):
                        out[f"{s}.self_attn.{k[len(t) + 7:]}"] = v
            for p in MLP_PROJ:
                out[f"{s}.mlp.{p}.weight"] = state[f"{t}.mlp.{p}.weight"]
        return raw, {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


__all__ = ["OlmoHybridAdapter"]
