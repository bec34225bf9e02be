"""Rows of benchmarks/ops_cpu.py against same-size Hugging Face models (CPU, fp32, fwd+bwd).

* ``mixer``: megasleep's whole Mamba-2 mixer vs transformers' ``Mamba2Mixer`` (its pure-torch path),
  same width, heads, state and chunk size (goal >= 1.3x).
* ``hf_step``: one training step (forward, CE loss, backward) of a megasleep model vs the same-size
  ``Mamba2ForCausalLM`` (pattern all ``M``, no MLP) and ``LlamaForCausalLM`` (pattern all ``A`` with
  the same SwiGLU width and grouped-query heads), tied embeddings on both sides. megasleep runs one
  window over the whole sequence, N = 1, with its default activation checkpointing (per (window,
  pass), which never recomputes a step's last window: here nothing) and without; and, for the
  Mamba-2 model (whose maths does not depend on the window), as two windows of T/2, where the default
  recomputes the first window in backward. Goal <= 0.8x HF's time.

  Each row also prints the share of HF's step spent in matrix-multiply and attention kernels
  (``aten::mm/bmm/addmm`` and SDPA, self time under torch.profiler): a model of the same size calls
  them with the same shapes, so that share bounds from below the ratio any implementation can reach.
  A last row times the Llama-shaped step once more with every RMSNorm cut to its weight multiply and
  RoPE removed (an ablation, not a model): how close to 0.8x hand-written norms and rotations could
  bring it at the very best. ``--hf-compile`` adds the Llama-shaped step with ``train.compile: true``
  (inductor over each block, which fuses the elementwise passes; HF stays eager).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from ops_cpu import Row, _ms, timed_pair


def preload() -> None:
    """Import the HF modeling modules before anything registers megasleep's stand-ins for the CUDA
    extensions: transformers picks its kernel-or-torch implementation at import time, and must see
    that causal_conv1d / mamba_ssm cannot run here (the comparison is with its pure-torch path)."""
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.mamba2.modeling_mamba2  # noqa: F401
    import transformers.models.qwen3_next.modeling_qwen3_next  # noqa: F401


def _ms_cfg(kind: str, a: argparse.Namespace):
    from megasleep.models import ModelConfig

    d = a.hf_d
    common = dict(name=f"bench-{kind}", vocab_size=a.hf_vocab, d_model=d, tie_embeddings=True, kernels="torch")
    if kind == "mamba2":
        return ModelConfig(**common, pattern="M" * a.hf_layers, mlp=dict(M=0.0),
                           mamba2=dict(d_state=64, headdim=64, expand=2, ngroups=1, d_conv=4, chunk_size=64))
    return ModelConfig(**common, pattern="A" * a.hf_layers, mlp=dict(A=4.0, multiple_of=8),
                       attn=dict(n_heads=d // 64, n_kv_heads=max(1, d // 256)))


def _hf_cfg(kind: str, a: argparse.Namespace):
    from transformers import LlamaConfig, Mamba2Config

    d = a.hf_d
    if kind == "mamba2":
        return Mamba2Config(vocab_size=a.hf_vocab, hidden_size=d, num_hidden_layers=a.hf_layers, num_heads=2 * d // 64,
                            head_dim=64, state_size=64, n_groups=1, expand=2, conv_kernel=4, chunk_size=64,
                            tie_word_embeddings=True, use_conv_bias=True, use_bias=False)
    return LlamaConfig(vocab_size=a.hf_vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=a.hf_layers,
                       num_attention_heads=d // 64, num_key_value_heads=max(1, d // 256), tie_word_embeddings=True,
                       max_position_embeddings=a.hf_T, attn_implementation="sdpa")


def bench_mixer(a: argparse.Namespace) -> list[Row]:
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from megasleep.models.cache import LayerCache, MixContext
    from megasleep.models.mamba2 import Mamba2

    torch.manual_seed(0)
    ours, theirs = Mamba2(_ms_cfg("mamba2", a)), Mamba2Mixer(_hf_cfg("mamba2", a), layer_idx=0)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in theirs.parameters())
    x = torch.randn(a.hf_batch, a.hf_T, a.hf_d)
    ctx = MixContext.for_span(0, a.hf_T, a.hf_T, backend="torch")

    def step(fn):
        def run():
            xx = x.clone().requires_grad_()
            fn(xx).square().mean().backward()
        return run

    t_ours, t_hf = timed_pair(step(lambda xx: ours(xx, LayerCache(), ctx)[0]), step(theirs), a.repeats)
    cfg = f"B={a.hf_batch} T={a.hf_T} d={a.hf_d} H={2 * a.hf_d // 64} P=64 N=64, {n_ours:,} vs {n_hf:,} params"
    return [Row("Mamba-2 mixer vs HF Mamba2Mixer (fwd+bwd)", cfg, f"ours {_ms(t_ours)} / HF {_ms(t_hf)}",
                t_hf / t_ours, 1.3)]


MATMUL_KERNELS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product")


def matmul_share(fn) -> float:
    """Fraction of ``fn``'s CPU time spent in matrix-multiply / attention kernels (profiled, self time)."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_KERNELS))
    return mm / max(total, 1e-9)


def bench_hf_steps(a: argparse.Namespace) -> list[Row]:
    from transformers import LlamaForCausalLM, Mamba2ForCausalLM

    from megasleep.models import HybridLM
    from megasleep.sleep import SleepConfig, sleep_forward

    rows = []
    ids = torch.randint(0, a.hf_vocab, (a.hf_batch, a.hf_T))
    for kind, hf_cls in (("mamba2", Mamba2ForCausalLM), ("llama", LlamaForCausalLM)):
        torch.manual_seed(0)
        ours, theirs = HybridLM(_ms_cfg(kind, a)), hf_cls(_hf_cfg(kind, a))
        n_ours, n_hf = ours.num_parameters(), sum(p.numel() for p in theirs.parameters())

        def hf_step(model=theirs):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        share = matmul_share(hf_step)
        runs = [(True, a.hf_T), (False, a.hf_T)] + ([(True, a.hf_T // 2)] if kind == "mamba2" else [])
        for ckpt, window in runs:
            scfg = SleepConfig(window=window, passes=1, checkpoint=ckpt)

            def our_step(model=ours, cfg=scfg):
                model.zero_grad(set_to_none=True)
                sleep_forward(model, ids, cfg).loss.backward()

            t_ours, t_hf = timed_pair(our_step, hf_step, a.repeats)
            how = "on (default)" if ckpt else "off"
            if window < a.hf_T:
                how += f", 2 windows of {window} (the first recomputed)"
            rows.append(Row(f"train step vs HF {hf_cls.__name__} (time ratio), checkpointing {how}",
                            f"B={a.hf_batch} T={a.hf_T} d={a.hf_d} layers={a.hf_layers} V={a.hf_vocab}, "
                            f"{n_ours:,} vs {n_hf:,} params",
                            f"ours {_ms(t_ours)} / HF {_ms(t_hf)}; HF spends {share:.0%} in mm/attention kernels",
                            t_ours / t_hf, 0.8, higher_is_better=False))
        if kind == "llama":
            scfg = SleepConfig(window=a.hf_T, passes=1, checkpoint=True)

            def stripped_step(model=ours, cfg=scfg):
                model.zero_grad(set_to_none=True)
                with _without_norms_and_rope():
                    sleep_forward(model, ids, cfg).loss.backward()

            t_ours, t_hf = timed_pair(stripped_step, hf_step, a.repeats)
            rows.append(Row("bound: same, ours with every RMSNorm cut to its weight multiply and no RoPE "
                            "(not a model: what the rest costs)", f"as above, {n_ours:,} vs {n_hf:,} params",
                            f"ours {_ms(t_ours)} / HF {_ms(t_hf)}", t_ours / t_hf))
            if a.hf_compile:  # train.compile: true (inductor over each block; the sleep loop stays eager)
                from megasleep.models.precision import compile_blocks

                compiled = HybridLM(_ms_cfg(kind, a))
                compiled.load_state_dict(ours.state_dict())
                compile_blocks(compiled)

                def compiled_step(model=compiled, cfg=scfg):
                    model.zero_grad(set_to_none=True)
                    sleep_forward(model, ids, cfg).loss.backward()

                compiled_step()  # compiles (not timed)
                t_ours, t_hf = timed_pair(compiled_step, hf_step, a.repeats)
                rows.append(Row(f"train step vs HF {hf_cls.__name__} (time ratio), train.compile: true "
                                "(inductor blocks), checkpointing on (default)", "as above, HF eager",
                                f"ours {_ms(t_ours)} / HF {_ms(t_hf)}", t_ours / t_hf, 0.8, higher_is_better=False))
    return rows


@contextlib.contextmanager
def _without_norms_and_rope():
    """Ablation for the Llama row: RMSNorm reduced to ``x * weight`` and RoPE to the identity, i.e. a
    step that pays nothing for normalising or rotating. What it still costs over 0.8x HF's time
    cannot come from hand-written norms or rotations (matmuls, SDPA, SwiGLU, residuals, the loss)."""
    from megasleep.models.rope import RopeCache

    norm_fwd, rope_call = torch.nn.RMSNorm.forward, RopeCache.__call__
    torch.nn.RMSNorm.forward = lambda self, x: x * self.weight
    RopeCache.__call__ = lambda self, x, positions, span: x
    try:
        yield
    finally:
        torch.nn.RMSNorm.forward, RopeCache.__call__ = norm_fwd, rope_call


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--hf-batch", type=int, default=2)
    ap.add_argument("--hf-T", type=int, default=512)
    ap.add_argument("--hf-d", type=int, default=256)
    ap.add_argument("--hf-layers", type=int, default=4)
    ap.add_argument("--hf-vocab", type=int, default=8192)
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time the Llama-shaped step with train.compile (inductor; compiles first, ~15 s)")
