"""mamba_ssm importer: a checkpoint written by mamba_ssm's own MambaLMHeadModel (built on CPU with the
CUDA stand-ins) loads into megasleep with every tensor mapped and none left over, and, run through
mamba_ssm's own modules with their pure-PyTorch reference ops patched in for the Triton / CUDA kernels,
gives the same logits as megasleep's HybridLM (window >= T, N = 1). Unfaithful configs are refused."""

from __future__ import annotations

import math

import pytest
import torch

from megasleep.checkpoint.adapters.mamba_ssm import MambaImportError, convert, convert_config
from megasleep.checkpoint.load import load_pretrained
from megasleep.ops._peers import triton_interpret_env


@pytest.fixture(scope="module")
def mamba_ssm():
    from megasleep.ops._peers import _prepare_mamba

    _prepare_mamba()
    try:
        import mamba_ssm.models.mixer_seq_simple as mss
        import mamba_ssm.modules.mamba2 as m2
        import mamba_ssm.modules.mha as mha
        import mamba_ssm.ops.triton.layer_norm as ln
        import mamba_ssm.ops.triton.layernorm_gated as lng
        import mamba_ssm.ops.triton.ssd_combined as ssd
        from mamba_ssm.models.config_mamba import MambaConfig
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"mamba_ssm does not import here: {type(exc).__name__}: {exc}")
    return dict(mss=mss, m2=m2, mha=mha, ln=ln, lng=lng, ssd=ssd, MambaConfig=MambaConfig)


class _RotaryRef(torch.nn.Module):
    """Pure-PyTorch stand-in for flash_attn.layers.rotary.RotaryEmbedding (not installed on CPU), with
    its semantics: inv_freq = base^(-arange(0, dim, 2)/dim) (a non-persistent buffer: no checkpoint
    tensor), positions seqlen_offset + t, rotation of the first ``dim`` dims of q and k, half-split
    (GPT-NeoX) layout when not interleaved."""

    def __init__(self, dim, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__()
        assert not interleaved and scale_base is None
        self.dim = dim
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim),
                             persistent=False)

    def _rot(self, x, cos, sin):  # x (B, T, H, D)
        d = self.dim
        x1, x2 = x[..., : d // 2], x[..., d // 2: d]
        c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., d:]], dim=-1)

    def forward(self, q, kv, seqlen_offset=0, max_seqlen=None):
        t = torch.arange(q.shape[1], dtype=torch.float32) + seqlen_offset
        f = torch.outer(t, self.inv_freq)
        cos, sin = f.cos(), f.sin()
        k = self._rot(kv[:, :, 0], cos, sin)
        return self._rot(q, cos, sin), torch.stack([k, kv[:, :, 1]], dim=2)


def _build(m, monkeypatch, **cfg):
    if m["mha"].RotaryEmbedding is None:  # flash_attn absent (always on CPU)
        monkeypatch.setattr(m["mha"], "RotaryEmbedding", _RotaryRef)
    torch.manual_seed(0)
    model = m["mss"].MambaLMHeadModel(m["MambaConfig"](**cfg))
    with torch.no_grad():  # move every weight (and bias) off its init value so a swapped mapping cannot hide
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _reference_forward(m, monkeypatch, model, ids):
    """mamba_ssm's own forward with its pure-PyTorch references in place of the GPU kernels."""
    ssd_ref = m["ssd"].ssd_chunk_scan_combined_ref

    def scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False, **kw):
        assert not kw.get("return_final_states") and kw.get("seq_idx") is None
        return ssd_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)

    monkeypatch.setattr(m["m2"], "mamba_chunk_scan_combined", scan)
    monkeypatch.setattr(m["m2"], "causal_conv1d_fn", None)
    monkeypatch.setattr(m["mha"], "causal_conv1d_fn", None)  # MHA's q/k/v conv through nn.Conv1d
    monkeypatch.setattr(m["ln"].RMSNorm, "forward",
                        lambda self, x, residual=None, prenorm=False, residual_in_fp32=False:
                        m["ln"].rms_norm_ref(x, self.weight, self.bias, eps=self.eps))
    monkeypatch.setattr(m["lng"].RMSNorm, "forward",
                        lambda self, x, z=None: m["lng"].rms_norm_ref(
                            x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                            norm_before_gate=self.norm_before_gate))
    for mod in model.modules():
        if isinstance(mod, m["m2"].Mamba2):
            mod.use_mem_eff_path = False
        if hasattr(mod, "fused_add_norm"):  # the fused add+norm kernel is Triton; same math unfused
            mod.fused_add_norm = False
    with torch.no_grad():
        return model(ids).logits


CONFIGS = {
    # hybrid with attention (GQA, full rotary) and GatedMLP in every block; vocab padded 50 -> 56
    "hybrid": dict(d_model=32, d_intermediate=48, n_layer=4, vocab_size=50,
                   ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                   attn_layer_idx=[1, 3],
                   attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "causal": True},
                   rms_norm=True, residual_in_fp32=True, fused_add_norm=False, pad_vocab_size_multiple=8,
                   tie_embeddings=True),
    # the released mamba2attn layout: conv over q/k/v (d_conv 4), rotary on half of each head, q/k/v and
    # output biases (MHA's defaults), no MLP
    "mamba2attn": dict(d_model=32, d_intermediate=0, n_layer=4, vocab_size=64,
                       ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
                       attn_layer_idx=[1, 3],
                       attn_cfg={"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "d_conv": 4, "rotary_emb_dim": 4,
                                 "causal": True},
                       rms_norm=True, residual_in_fp32=True, fused_add_norm=False, pad_vocab_size_multiple=8,
                       tie_embeddings=True),
    # pure Mamba-2 (the released mamba2-* layout: no MLP), untied head, 2 groups
    "mamba2": dict(d_model=32, d_intermediate=0, n_layer=3, vocab_size=64,
                   ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8},
                   rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                   tie_embeddings=False),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_mamba_ssm_checkpoint_imports_every_tensor_and_matches_logits(mamba_ssm, monkeypatch, tmp_path, kind):
    src = _build(mamba_ssm, monkeypatch, **CONFIGS[kind])
    src.save_pretrained(str(tmp_path / "ckpt"))  # mamba_ssm's own writer: config.json + pytorch_model.bin
    saved = torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=True)

    cfg, state, report = convert(tmp_path / "ckpt")
    # every source tensor mapped (biases only when zero, tied head only when equal), none left over
    assert set(report["mapped"]) == set(saved)
    assert all(report["mapped"][k] for k in saved), [k for k in saved if not report["mapped"][k]]
    model = load_pretrained(tmp_path / "ckpt")
    assert set(model.state_dict()) == set(state) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    n_attn = len(CONFIGS[kind].get("attn_layer_idx", []))
    assert cfg.pattern.count("A") == n_attn and len(cfg.pattern) == CONFIGS[kind]["n_layer"]
    assert cfg.vocab_size == saved["backbone.embedding.weight"].shape[0]

    # same function: mamba_ssm's modules (reference ops) vs megasleep's HybridLM, window >= T, N = 1
    torch.manual_seed(1)
    ids = torch.randint(0, CONFIGS[kind]["vocab_size"], (2, 32))
    want = _reference_forward(mamba_ssm, monkeypatch, src.eval(), ids)
    with torch.no_grad():
        got = model(ids)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), err


@pytest.mark.gpu
# under Triton's interpreter (CPU, ~16 s a model): the pure Mamba-2 layout (2 groups, the fused add+norm)
@pytest.mark.parametrize("kind", ["mamba2"] if triton_interpret_env() else sorted(CONFIGS))
def test_logits_agree_on_cuda(mamba_ssm, monkeypatch, tmp_path, kind):
    """mamba_ssm's own GPU forward (Triton SSD scan and RMSNorm kernels; the fused conv path when the
    causal_conv1d extension is compiled) vs megasleep's HybridLM on CUDA (kernels='auto'). With
    ``TRITON_INTERPRET=1``, both on CPU with the Triton kernels under Triton's interpreter
    (``tests/ops/test_triton_interpreter.py`` runs it so)."""
    from megasleep.ops import _peers
    from megasleep.ops.testing import kernel_test_device

    dev = kernel_test_device()
    m = mamba_ssm
    src = _build(m, monkeypatch, **CONFIGS[kind])
    src.save_pretrained(str(tmp_path / "ckpt"))
    src = src.to(dev).eval()
    if _peers.causal_conv1d_fn()[0] is None:  # no compiled causal_conv1d: mamba_ssm convolves with nn.Conv1d
        monkeypatch.setattr(m["m2"], "causal_conv1d_fn", None)  # (on CPU its import succeeds on a stand-in)
        monkeypatch.setattr(m["mha"], "causal_conv1d_fn", None)
        for mod in src.modules():
            if isinstance(mod, m["m2"].Mamba2):
                mod.use_mem_eff_path = False
    torch.manual_seed(1)
    ids = torch.randint(0, CONFIGS[kind]["vocab_size"], (2, 64), device=dev)
    model = load_pretrained(tmp_path / "ckpt", device=dev)
    with torch.no_grad():
        want = src(ids).logits.float()
        got = model(ids).float()
    err = (got - want).abs().max().item()
    print(f"[{kind}] max |logit diff| on {dev} = {err:.3g} (max |logit| {want.abs().max().item():.3g})")
    assert err < 1e-2 * max(1.0, want.abs().max().item()), err


def test_export_cli_converts_mamba_ssm_dir(mamba_ssm, monkeypatch, tmp_path):
    from megasleep.cli import main

    src = _build(mamba_ssm, monkeypatch, **CONFIGS["hybrid"])
    src.save_pretrained(str(tmp_path / "ckpt"))
    assert main(["export", "--from-mamba-ssm", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ms")]) == 0
    a, b = load_pretrained(tmp_path / "ckpt"), load_pretrained(tmp_path / "ms")
    ids = torch.randint(0, 50, (1, 24))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert b.pretrained_meta["source"]["kind"] == "mamba_ssm"


BASE = dict(d_model=64, d_intermediate=0, n_layer=4, vocab_size=100, ssm_cfg={"layer": "Mamba2"},
            attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
            pad_vocab_size_multiple=8, tie_embeddings=True)
ATTN = {"num_heads": 4, "head_dim": 16, "rotary_emb_dim": 16, "causal": True}


@pytest.mark.parametrize("change, pattern", [
    (dict(ssm_cfg={}), "Mamba-1"),
    (dict(ssm_cfg={"layer": "Mamba1"}), "Mamba-1"),
    (dict(rms_norm=False), "rms_norm=false"),
    (dict(ssm_cfg={"layer": "Mamba2", "D_has_hdim": True}), "D_has_hdim"),
    (dict(ssm_cfg={"layer": "Mamba2", "norm_before_gate": True}), "norm_before_gate"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_ssm": 64}), "d_ssm"),
    (dict(ssm_cfg={"layer": "Mamba2", "dt_limit": [0.0, 0.1]}), "dt_limit"),
    (dict(ssm_cfg={"layer": "Mamba2", "mystery": 1}), "unknown ssm_cfg key 'mystery'"),
    (dict(attn_layer_idx=[1], attn_cfg=dict(ATTN, causal=False)), "causal is false"),
    (dict(attn_layer_idx=[1], attn_cfg=dict(ATTN, rotary_emb_interleaved=True)), "interleaved"),
    (dict(attn_layer_idx=[1], attn_cfg=dict(ATTN, mlp_dim=64)), "mlp_dim"),
    (dict(attn_layer_idx=[7], attn_cfg=ATTN), "outside"),
    (dict(n_embd=3), "unknown MambaConfig keys"),
])
def test_unfaithful_configs_are_refused(change, pattern):
    raw = {**BASE, **change}
    with pytest.raises(MambaImportError, match=pattern):
        convert_config(raw, {}, "cfg.json")


def test_faithful_options_are_accepted():
    raw = {**BASE, "attn_layer_idx": [3], "attn_cfg": dict(ATTN, num_heads_kv=2, rotary_emb_base=500000.0,
                                                            softmax_scale=16 ** -0.5, qkv_proj_bias=False),
           "ssm_cfg": {"layer": "Mamba2", "d_ssm": 128, "use_mem_eff_path": False, "dt_limit": [0.0, math.inf],
                       "conv_init": 0.1}}
    cfg, facts = convert_config(raw, {}, "cfg.json")
    assert cfg.pattern == "MMMA" and cfg.attn.rope_theta == 500000.0 and cfg.attn.n_kv_heads == 2
    raw["attn_cfg"].update(d_conv=4, rotary_emb_dim=8, softmax_scale=0.5)
    a = convert_config(raw, {}, "cfg.json")[0].attn
    assert (a.d_conv, a.rotary_dim, a.softmax_scale) == (4, 8, 0.5)
    assert cfg.mamba2.d_state == 128 and cfg.mamba2.headdim == 64 and cfg.mamba2.chunk_size == 256
    assert cfg.mlp.A == 0 and cfg.mlp.M == 0
