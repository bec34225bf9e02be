"""Collapse diagnostics: did the sleep passes consolidate, or did their features collapse?

A model can fail to gain from sleep in two ways that an accuracy table cannot tell apart: the sleep
passes may work but store nothing the task needs, or the features fed back from pass to pass may
converge to one shared direction, so that every token writes (nearly) the same key and the fast
weights can hold about one association. These numbers tell them apart (docs/sleep.md#diagnostics).
They are measured on consolidation windows (windows followed by another one, i.e. the ones that
sleep), per core pass ``j`` (1 = the wake pass) and per SSM layer:

* ``rms``: root-mean-square of the residual features leaving pass ``j`` (they grow with the passes when
  nothing normalises them between passes);
* ``key_share``: squared norm of the mean of the L2-normalised keys (gated-delta-net layers): 1 when
  every position writes the same key, about 1/positions for unrelated keys; averaged over samples and
  heads;
* ``input_top_share`` / ``input_erank``: of the mixer's input matrix (positions x features) of one
  sample, the fraction of its energy in the top singular direction and the effective rank
  ``exp(entropy of the normalised squared singular values)``;
* ``memory_worth`` (per model, not per pass): the answer loss when every sample gets another sample's
  fast weights at each eviction (``S`` rolled by one along the batch) minus the loss with its own: how
  many nats the carried state is worth. One extra forward.

:func:`collapse_diagnostics` returns them as one flat dict (``diag/pass2/G1/key_share``...), ready for
JSONL, TensorBoard and tables; :func:`collapse_status` applies the rule that labels a run collapsed.
``python -m megasleep.sleep.diagnostics RUN_DIR...`` measures a finished training run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from megasleep.models.gdn import GatedDeltaNet
from megasleep.models.hybrid import Caches, HybridLM
from megasleep.sleep.config import SleepConfig
from megasleep.sleep.loop import SleepRunner

PREFIX = "diag/"
COLLAPSE_HIGH = 0.9  # a last sleep pass whose keys share more than this ...
COLLAPSE_LOW = 0.5   # ... while the awake reference's share less than this: collapsed


def key_share(keys: Tensor) -> Tensor:
    """``keys`` [..., positions, dim], already L2-normalised -> ||mean over positions||^2 [...]."""
    return keys.mean(-2).pow(2).sum(-1)


def spectrum_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` [B, positions, dim] -> (top-direction energy share [B], effective rank [B])."""
    s2 = torch.linalg.svdvals(x.double()).pow(2)
    p = s2 / s2.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return p[..., 0], entropy.exp()


class DiagnosticRunner(SleepRunner):
    """The sleep loop, recording per (pass, SSM layer) statistics of consolidation windows. Keys are
    captured by forward hooks on the gated-delta-net mixers; the loop itself is not changed."""

    def __init__(self, model: HybridLM, cfg: SleepConfig, keep: Tensor | None = None):
        super().__init__(model, cfg)
        self.keep = keep  # [B, T] bool: positions that count (e.g. not padding); None = all
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # key -> [sum, count]
        self._span = (0, 0)
        self._pass = 0
        self._T = 0

    def _add(self, key: str, values: Tensor) -> None:
        acc = self.sums[key]
        acc[0] += float(values.double().sum())
        acc[1] += values.numel()

    def _recording(self) -> bool:
        return self._span[1] < self._T  # a window followed by another one: it sleeps

    def _kept(self) -> Tensor | None:
        s, e = self._span
        return None if self.keep is None else self.keep[:, s:e]

    def context(self, s, e, doc_ids, reset, device):
        self._span, self._pass = (s, e), 0
        return super().context(s, e, doc_ids, reset, device)

    def core_pass(self, h, caches, ctx, last=False):
        self._pass += 1
        h, caches = super().core_pass(h, caches, ctx, last)
        if self._recording():
            keep = self._kept()
            sq = h.double().pow(2).mean(-1)  # [B, L]
            self._add(f"pass{self._pass}/sq", sq if keep is None else sq[keep])
        return h, caches

    def _hook(self, name: str):
        def hook(mixer, args, _output):
            if not self._recording():
                return
            x, cache, ctx = args
            keep = self._kept()
            rows = range(x.shape[0]) if keep is None else [b for b in range(x.shape[0]) if keep[b].any()]
            xs = [x[b] if keep is None else x[b, keep[b]] for b in rows]
            if not xs:
                return
            stats = [spectrum_stats(xi[None]) for xi in xs]
            self._add(f"pass{self._pass}/{name}/input_top_share", torch.cat([t for t, _ in stats]))
            self._add(f"pass{self._pass}/{name}/input_erank", torch.cat([r for _, r in stats]))
            if isinstance(mixer, GatedDeltaNet):
                k, _ = mixer.k_conv1d.run(mixer.k_proj(x), cache.conv[1] if cache.conv else None, ctx)
                k = F.normalize(k.view(*k.shape[:2], mixer.n_heads, mixer.head_k_dim).double(), dim=-1, eps=1e-6)
                # [positions, heads, dim] -> one share per head
                shares = [key_share((k[b] if keep is None else k[b, keep[b]]).transpose(0, 1)) for b in rows]
                self._add(f"pass{self._pass}/{name}/key_share", torch.cat(shares))  # per (sample, head)
        return hook

    def __call__(self, input_ids, *args, **kwargs):
        self._T = input_ids.shape[1]
        handles = [blk.mixer.register_forward_hook(self._hook(f"{blk.letter}{blk.index}"))
                   for blk in self.model.core if blk.is_ssm]
        try:
            return super().__call__(input_ids, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def results(self) -> dict[str, float]:
        out = {}
        for key, (total, n) in sorted(self.sums.items()):
            if key.endswith("/sq"):
                out[key[:-3] + "/rms"] = math.sqrt(total / n) if n else float("nan")
            else:
                out[key] = total / n if n else float("nan")
        return out


class RolledStateRunner(SleepRunner):
    """The sleep loop in which every sample continues, after each eviction, with the fast weights of
    the previous sample in the batch (``S`` rolled by one along the batch)."""

    def evict(self, caches: Caches) -> Caches:
        return [c if c.ssm is None else replace(c, ssm=c.ssm.roll(1, 0)) for c in super().evict(caches)]


def _as_batches(batches) -> list[dict]:
    return [batches] if isinstance(batches, dict) else list(batches)


@torch.no_grad()
def collapse_diagnostics(model: HybridLM, batches, sleep: SleepConfig, pad_id: int | None = None) -> dict[str, float]:
    """The diagnostics of ``model`` run at ``sleep.passes`` over ``batches`` (one batch dict with
    ``input_ids`` [B, T], optional ``loss_mask`` and ``doc_ids``, or a list of them). Positions holding
    ``pad_id`` are left out of the per-pass statistics. Returns a flat dict of floats under ``diag/``:
    ``passes``, ``loss``, ``loss_rolled``, ``memory_worth`` and ``pass{j}/...`` (see the module doc)."""
    cfg = sleep.model_copy(update={"random_passes": None, "checkpoint": False, "adaptive_tol": None})
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    own = rolled = tokens = 0.0
    runner = None
    try:
        for batch in _as_batches(batches):
            ids = batch["input_ids"].to(device)
            if ids.shape[0] < 2:
                raise ValueError(f"collapse diagnostics need batches of >= 2 samples (memory worth swaps "
                                 f"states between samples); got a batch of shape {tuple(ids.shape)}")
            mask = batch.get("loss_mask")
            mask = None if mask is None else mask.to(device)
            docs = batch.get("doc_ids")
            docs = None if docs is None else docs.to(device)
            keep = None if pad_id is None else ids != pad_id
            if runner is None:
                runner = DiagnosticRunner(model, cfg, keep)
            runner.keep = keep
            a = runner(ids, mask, docs)
            b = RolledStateRunner(model, cfg)(ids, mask, docs)
            own += float(a.loss_sum)
            rolled += float(b.loss_sum)
            tokens += a.n_tokens
    finally:
        model.train(was_training)
    if runner is None:
        raise ValueError("collapse diagnostics: no batches")
    out = {"passes": float(cfg.passes), "loss": own / max(tokens, 1), "loss_rolled": rolled / max(tokens, 1)}
    out["memory_worth"] = out["loss_rolled"] - out["loss"]
    out.update(runner.results())
    return {PREFIX + k: v for k, v in out.items()}


def max_key_share(diag: dict[str, float], pass_index: int) -> float | None:
    """Largest key share over the SSM layers at core pass ``pass_index`` (None if not measured)."""
    head = f"{PREFIX}pass{pass_index}/"
    vals = [v for k, v in diag.items() if k.startswith(head) and k.endswith("/key_share")]
    return max(vals) if vals else None


def collapse_status(diag: dict[str, float], reference: dict[str, float] | None = None,
                    high: float = COLLAPSE_HIGH, low: float = COLLAPSE_LOW) -> str:
    """Label one model's diagnostics at its own N.

    * ``"awake"``: N = 1, no sleep pass to collapse;
    * ``"collapsed"``: the last sleep pass's key share (largest over SSM layers) is above ``high``
      while the awake reference's is below ``low``: the reference's keys are diverse and the sleep
      passes' are not. The reference is ``reference``'s wake pass (pass 1) — the N = 1 model of the
      same seed in a study — or, without one, this model's own wake pass;
    * ``"shared keys"``: above ``high`` at the last pass but the reference is not below ``low`` (the
      keys are shared even awake: a problem, but not one the sleep passes made);
    * ``"ok"`` otherwise; ``"unknown"`` when no key share was measured (no gated-delta-net layer).
    """
    passes = int(diag.get(PREFIX + "passes", 1))
    if passes <= 1:
        return "awake"
    last, ref = max_key_share(diag, passes), max_key_share(reference if reference is not None else diag, 1)
    if last is None or ref is None:
        return "unknown"
    if last > high:
        return "collapsed" if ref < low else "shared keys"
    return "ok"


def diagnostics_table(rows: dict[str, tuple[dict[str, float], str]]) -> str:
    """Markdown: one row per model (``name -> (diagnostics, status)``): memory worth, and per pass the
    largest key share and the residual RMS."""
    if not rows:
        return ""
    most = max(int(d.get(PREFIX + "passes", 1)) for d, _ in rows.values())
    head = ("| model | N | memory worth (nats) | " + " | ".join(f"key share p{j}" for j in range(1, most + 1))
            + " | " + " | ".join(f"rms p{j}" for j in range(1, most + 1)) + " | status |")
    lines = [head, "|---|---|---|" + "---|" * (2 * most) + "---|"]

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for name, (d, status) in rows.items():
        n = int(d.get(PREFIX + "passes", 1))
        shares = [fmt(max_key_share(d, j)) for j in range(1, most + 1)]
        rms = [fmt(d.get(f"{PREFIX}pass{j}/rms")) for j in range(1, most + 1)]
        lines.append(f"| {name} | {n} | {fmt(d.get(PREFIX + 'memory_worth'))} | " + " | ".join(shares)
                     + " | " + " | ".join(rms) + f" | {status} |")
    return "\n".join(lines)
