"""Block options for OLMo-Hybrid-style models (post-norm blocks, q/k RMSNorm over the projected width, GDN
beta in [0, 2], FLA's q/k L2 norm, the GDN output-norm eps): each does what it says against a by-hand
formula, the defaults leave a model as it was, and the sleep loop (streaming engine == chunked forward,
GDN state carried across windows and passes) works for models that use them."""

from __future__ import annotations

import pytest
import torch

import megasleep.models.gdn as gdn_module
from megasleep.config import ConfigError, validate
from megasleep.inference import Session
from megasleep.models.cache import MixContext
from megasleep.models.config import ModelConfig
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_config, tiny_model

OLMO = dict(post_norm="A", attn=dict(n_heads=4, n_kv_heads=2, qk_norm=True),
            gdn=dict(n_heads=2, head_dim=8, expand_v=2.0, chunk_size=8, allow_neg_eigval=True, l2norm="fla",
                     norm_eps=1e-5), norm_eps=1e-6)


def _ctx(T: int) -> MixContext:
    return MixContext.for_span(0, T, T, backend="torch")


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def test_defaults_are_the_old_blocks():
    cfg = tiny_config("AGMA")
    assert cfg.post_norm == "" and not cfg.attn.qk_norm
    assert (cfg.gdn.allow_neg_eigval, cfg.gdn.l2norm, cfg.gdn.norm_eps) == (False, "clamp", None)
    model = tiny_model("AGMA")
    assert not any(blk.post_norm for blk in model.layers)
    assert not any("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters())
    gdn = model.layers[1].mixer
    assert (gdn.beta_scale, gdn.l2norm, gdn.o_norm.eps) == (1.0, gdn_module.clamp_l2norm, cfg.norm_eps)


def test_post_norm_block_normalises_the_branch_outputs():
    model = tiny_model("A", **OLMO)
    _randomise(model)
    blk = model.layers[0]
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    ctx = _ctx(6)
    got, _ = blk(x, blk.init_cache(2), ctx)
    y, _ = blk.mixer(x, blk.init_cache(2), ctx)
    h = x + blk.norm(y)
    torch.testing.assert_close(got, h + blk.mlp_norm(blk.mlp(h)))
    pre = tiny_model("A", **{**OLMO, "post_norm": ""}).layers[0]
    pre.load_state_dict(blk.state_dict())  # same parameters, same names: only the placement differs
    assert not torch.allclose(pre(x, pre.init_cache(2), ctx)[0], got)


def test_qk_norm_is_over_the_whole_projected_width():
    attn = tiny_model("A", **OLMO).layers[0].mixer
    _randomise(attn)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    ctx = _ctx(6)

    def out():
        return attn(x, attn.init_cache(2), ctx)[0]

    ref = out()
    with torch.no_grad():  # scaling all of q (and all of k) does nothing after an RMSNorm over the width ...
        attn.q_proj.weight.mul_(7.0)
        attn.k_proj.weight.mul_(0.2)
    torch.testing.assert_close(out(), ref, rtol=0, atol=1e-4)  # (up to the norm's eps)
    with torch.no_grad():  # ... scaling one head's rows does: the norm is not per head
        attn.q_proj.weight[:attn.head_dim].mul_(5.0)
    assert (out() - ref).abs().max() > 1e-2


def test_gdn_beta_scale_l2norm_and_output_eps(monkeypatch):
    model = tiny_model("G", **OLMO)
    _randomise(model)
    gdn = model.layers[0].mixer
    assert gdn.o_norm.eps == 1e-5 and gdn.head_v_dim == 16
    seen = {}
    real = gdn_module.gated_delta_rule

    def spy(q, k, v, g, beta, **kw):
        seen.update(q=q, k=k, beta=beta)
        return real(q, k, v, g, beta, **kw)

    monkeypatch.setattr(gdn_module, "gated_delta_rule", spy)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    gdn(x, gdn.init_cache(2), _ctx(9))
    torch.testing.assert_close(seen["beta"], 2 * torch.sigmoid(gdn.b_proj(x)))
    assert seen["beta"].max() > 1  # negative eigenvalues of I - beta k k^T do occur
    q = gdn.q_conv1d.run(gdn.q_proj(x), None, _ctx(9))[0].view(2, 9, 2, 8)
    torch.testing.assert_close(seen["q"], q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6))
    small = torch.full((1, 1, 1, 8), 1e-4, dtype=torch.float64)  # where FLA's and torch's L2 norms differ
    assert gdn_module.fla_l2norm(small).norm() < 0.99 < gdn_module.clamp_l2norm(small).norm()


def test_bad_post_norm_letter_is_named():
    with pytest.raises(ConfigError, match="post_norm='AX'"):
        validate(ModelConfig, {"vocab_size": 8, "d_model": 8, "pattern": "A", "post_norm": "AX"}, "m.yaml")


@pytest.mark.parametrize("L,N,eviction", [(5, 2, "hard"), (4, 3, "sliding")])
def test_streaming_engine_matches_chunked_sleep_forward(L, N, eviction):
    """The sleep loop with the new blocks: token-by-token decoding (GDN step path, q/k norm per token,
    post-norm) == the chunked forward, across windows and sleep passes; and N changes the logits."""
    model = tiny_model("GAGA", n_prelude=1, **OLMO)
    _randomise(model, seed=L)
    ids = torch.randint(0, 61, (2, 3 * L + 2), generator=torch.Generator().manual_seed(L))
    cfg = SleepConfig(window=L, passes=N, eviction=eviction)
    with torch.no_grad():
        ref = sleep_forward(model, ids, cfg, return_logits=True).logits
        sess = Session(model, cfg, batch=2)
        got = torch.cat([sess.feed(ids[:, :L + 1]), *(sess.step(ids[:, t])[:, None] for t in range(L + 1, ids.shape[1]))], 1)
        once = sleep_forward(model, ids, SleepConfig(window=L, passes=1, eviction=eviction), return_logits=True).logits
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-11)
    assert (ref - once)[:, L:].abs().max() > 1e-6 and (ref - once)[:, :L].abs().max() == 0
