"""The sleep loop (docs/sleep.md) — the one place where windows, passes and eviction are decided.

    S <- 0 for every SSM mixer
    for each window c of L tokens:
        h <- prelude(Embed(c)); h, S <- core(h, S)          # pass 1 = wake pass
        loss += masked CE(head(coda(h)))
        if another window follows:                         # sleep before eviction
            for j in 2..N: h, S <- core(h, S)              # same window, features fed back
        evict short-term memory (hard: all; sliding: keep last L-1 wake-pass keys)

Short-term memory (attention KV, short-conv history) is what a pass *starts* from: every pass over a
window starts from the short-term memory the window started with, and what the next window inherits
is the wake pass's (the streaming engine only ever has the wake pass's). Only the fast weights ``S``
flow from pass to pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from megasleep.models.cache import LayerCache, MixContext, doc_resets
from megasleep.models.hybrid import Caches, HybridLM
from megasleep.models.norm import upcast
from megasleep.sleep.config import SleepConfig


@dataclass
class SleepOutput:
    """Losses come as sums with their token counts: micro-batches and ranks add up with one ``+=`` and
    one all-reduce, and means are taken once, at the end."""

    loss: Tensor                      # mean CE over target tokens (0 if none)
    loss_sum: Tensor                  # summed CE over target tokens
    n_tokens: int                     # number of target tokens
    window_loss_sum: Tensor           # [windows] summed CE per window index (detached)
    window_tokens: list[int]          # target tokens per window index
    passes: int                       # N used for this call
    passes_used: list[int]            # passes actually run per window (adaptive sleep may stop early)
    caches: Caches | None = None
    logits: Tensor | None = None      # [B, T, V] when return_logits
    forwards: int = 0                 # (window, core pass) forwards executed (for FLOP accounting)
    extras: dict = field(default_factory=dict)

    @property
    def window_loss(self) -> list[float]:
        """Mean CE per window index (nan where a window has no targets); reads the sums to the host."""
        return [s / n if n else float("nan") for s, n in zip(self.window_loss_sum.tolist(), self.window_tokens)]


def _relative_change(new: Caches, old: Caches, idx: list[int]) -> float:
    worst = 0.0
    for i in idx:
        if new[i].ssm is None:
            continue
        a, b = new[i].ssm.float(), old[i].ssm.float()
        num = (a - b).flatten(1).norm(dim=1)
        den = b.flatten(1).norm(dim=1).clamp_min(1e-12)
        worst = max(worst, float((num / den).max()))
    return worst


class SleepRunner:
    """Runs the loop above for one batch. Subclass and override a step to change one behaviour."""

    def __init__(self, model: HybridLM, cfg: SleepConfig, backend: str | None = None):
        self.model, self.cfg = model, cfg
        self.backend = backend or model.config.kernels

    # -- the pieces, each small ---------------------------------------------------------------------
    def context(self, s: int, e: int, doc_ids, reset, device) -> MixContext:
        """Context of tokens [s, e) of the sequence (positions are absolute: windows start at 0)."""
        return MixContext.for_span(s, e, self.cfg.window, self.cfg.eviction,
                                   None if doc_ids is None else doc_ids[:, s:e],
                                   None if reset is None else reset[:, s:e], self.backend, device)

    def _maybe_checkpoint(self, fn, *args, last: bool = False):
        """Recompute ``fn`` in backward when checkpointing, except for the step's last region: backward
        starts with it, so recomputing it would rebuild at once what it just freed (same peak, more work)."""
        if self.cfg.checkpoint and torch.is_grad_enabled() and not last:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def core_pass(self, h: Tensor, caches: Caches, ctx: MixContext, last: bool = False) -> tuple[Tensor, Caches]:
        """One pass of the core. Activation checkpointing (training only): the whole (window, pass)
        by default; with ``checkpoint_blocks = k`` every k-th block alone (the others keep their
        activations: less recompute, more memory; docs/performance.md has the measurements). ``last``:
        the step's last (window, pass): a whole pass is not recomputed then (see ``_maybe_checkpoint``);
        single blocks still are (keeping every block of the pass would far exceed one block's recompute)."""
        idx, k = self.model.core_idx, self.cfg.checkpoint_blocks
        if k is None or not (self.cfg.checkpoint and torch.is_grad_enabled()):
            return self._maybe_checkpoint(lambda x: self.model.run_blocks(idx, x, caches, ctx), h, last=last)
        caches = list(caches)
        for n, i in enumerate(idx):
            if n % k == 0:
                h, caches[i] = checkpoint(lambda x, i=i, c=caches[i]: self.model.layers[i](x, c, ctx), h,
                                          use_reentrant=False)
            else:
                h, caches[i] = self.model.layers[i](h, caches[i], ctx)
        return h, caches

    def wake_head_loss(self, h, caches, ctx, targets, target_mask, need_logits, n_targets: int, last: bool = False):
        """coda + head + masked CE of one window. ``n_targets`` (the window's target count, counted on the
        host before the loop) decides whether the head runs at all, without a device sync.

        Without ``need_logits`` the head is fused with the loss (``HybridLM.head_loss``: no ``[B, L, V]``
        logits); only the coda is checkpointed, and the head computes its gradients in the forward when
        nothing is recomputed anyway (no checkpointing, or the step's last window, whose backward comes
        next). With ``need_logits`` (evaluation) coda + head + CE are one checkpointed region."""
        model = self.model
        if need_logits:
            def fn(x):
                x, new = model.run_blocks(model.coda_idx, x, caches, ctx)
                logits = model.head(x)
                ce = F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), reduction="none")
                return logits, new, (ce * target_mask.flatten()).sum()

            return self._maybe_checkpoint(fn, h, last=last)
        if model.coda_idx:
            h, new = self._maybe_checkpoint(lambda x: model.run_blocks(model.coda_idx, x, caches, ctx), h, last=last)
        else:
            new = list(caches)
        if not n_targets:
            return None, new, upcast(h.new_zeros(()))
        grad_in_forward = last or not self.cfg.checkpoint
        return None, new, model.head_loss(h, targets, target_mask, grad_in_forward=grad_in_forward)

    def feed_back(self, h: Tensor, core_input: Tensor | None) -> Tensor:
        """What enters a sleep pass: the previous pass's features, by default unchanged (the paper's
        method); ``reinject`` adds the window's core input, ``feedback_norm`` rescales each position to
        the RMS of its core input (the scale the core saw on the wake pass)."""
        cfg = self.cfg
        if not (cfg.reinject or cfg.feedback_norm):
            return h
        if core_input is None:
            raise ValueError("sleep.reinject / sleep.feedback_norm need the window's core input: "
                             "pass core_input= to SleepRunner.end_window")
        if cfg.reinject:
            h = h + core_input
        if cfg.feedback_norm:
            def rms(x: Tensor) -> Tensor:
                return upcast(x).pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()

            h = h * (rms(core_input) / rms(h)).to(h.dtype)
        return h

    def sleep(self, h: Tensor, caches: Caches, ctx: MixContext, start_short: list[LayerCache],
              passes: int, core_input: Tensor | None = None) -> tuple[Tensor, Caches, int]:
        """Passes 2..N over the same window: features fed back, S carried, short-term memory restarted."""
        core = self.model.core_idx
        k = self.cfg.truncate_backprop
        used = 1
        for j in range(2, passes + 1):
            prev = caches
            caches = list(caches)
            for i, short in zip(core, start_short):
                caches[i] = caches[i].with_short_term(short)
            h = self.feed_back(h, core_input)
            if k is not None and j <= passes - k:
                h, caches = self._truncated_pass(h, caches, ctx)
            else:
                h, caches = self.core_pass(h, caches, ctx)
            used = j
            if self.cfg.adaptive_tol is not None and _relative_change(caches, prev, core) < self.cfg.adaptive_tol:
                break
        return h, caches, used

    def _truncated_pass(self, h: Tensor, caches: Caches, ctx: MixContext) -> tuple[Tensor, Caches]:
        """A sleep pass without gradient. ``detach``: h and S leave it cut from everything before, so no
        gradient reaches the wake pass or the window's tokens through S. ``straight_through``: the pass's
        change to h and S is added as a constant, so gradient flows through it as through the identity."""
        with torch.no_grad():
            new_h, new = self.core_pass(h, caches, ctx)
        if self.cfg.truncate_mode == "straight_through":
            def through(new_t, old_t):
                return old_t + (new_t - old_t).detach() if isinstance(old_t, Tensor) else new_t

            return through(new_h, h), [replace(c, ssm=through(c.ssm, o.ssm)) for c, o in zip(new, caches)]
        return new_h.detach(), [LayerCache(**{f: (t.detach() if isinstance(t, Tensor) else t)
                                              for f, t in vars(c).items()}) for c in new]

    def end_window(self, h: Tensor, caches: Caches, ctx: MixContext, start_short: list[LayerCache],
                   passes: int, core_input: Tensor | None = None) -> tuple[Caches, int]:
        """Sleep passes 2..N, then put back the wake pass's short-term memory (what the next window
        inherits). Shared by the chunked forward and the streaming engine. ``core_input`` (the window's
        features entering the core on the wake pass) is needed only by ``reinject`` / ``feedback_norm``."""
        core = self.model.core_idx
        if passes <= 1:
            return caches, 1
        wake_short = [caches[i].short_term() for i in core]
        _, caches, used = self.sleep(h, caches, ctx, start_short, passes, core_input)
        for i, short in zip(core, wake_short):
            caches[i] = caches[i].with_short_term(short)
        return caches, used

    def evict(self, caches: Caches) -> Caches:
        """Window boundary: hard drops all short-term memory, sliding keeps the last L-1 keys."""
        return [c.evict(self.cfg.eviction, self.cfg.window) for c in caches]

    # -- the loop -----------------------------------------------------------------------------------
    def __call__(self, input_ids: Tensor, loss_mask: Tensor | None = None, doc_ids: Tensor | None = None,
                 step: int | None = None, return_logits: bool = False, caches: Caches | None = None) -> SleepOutput:
        model, cfg, L = self.model, self.cfg, self.cfg.window
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        device = input_ids.device
        model.check_ids(input_ids)
        if loss_mask is None:
            loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
            loss_mask[:, 0] = False
        elif loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        passes = cfg.passes_for_step(step)
        caches = caches if caches is not None else model.init_caches(B, device, model.embed_tokens.weight.dtype)
        reset = doc_resets(doc_ids)
        # target of position t is token t+1; the last position has none
        targets = torch.zeros_like(input_ids)
        targets[:, :-1] = input_ids[:, 1:]
        tmask = torch.zeros_like(loss_mask, dtype=torch.bool)
        tmask[:, :-1] = loss_mask[:, 1:].bool()

        # the host syncs of a call sit outside the window and pass loops: target counts before them,
        # the per-window loss sums stay on the device (SleepOutput.window_loss reads them when asked)
        counts = window_target_counts(tmask, L)
        loss_sum, wsums, passes_used, logits_out, caches, forwards = self.run_windows(
            input_ids, targets, tmask, counts, doc_ids, reset, caches, passes, return_logits)
        n_tok = sum(counts)
        loss = loss_sum / max(n_tok, 1)
        return SleepOutput(loss=loss, loss_sum=loss_sum, n_tokens=n_tok, window_loss_sum=torch.stack(wsums),
                           window_tokens=counts, passes=passes, passes_used=passes_used,
                           caches=caches, logits=torch.cat(logits_out, 1) if return_logits else None,
                           forwards=forwards)

    def run_windows(self, input_ids, targets, tmask, counts, doc_ids, reset, caches, passes, return_logits):
        """The window and pass loops. No tensor becomes a Python number in here (no host sync), except
        adaptive sleep's stopping test (``adaptive_tol``, inference only)."""
        model, L, T, device = self.model, self.cfg.window, input_ids.shape[1], input_ids.device
        loss_sum = torch.zeros((), device=device)
        wsums, passes_used, logits_out = [], [], []
        forwards = 0
        for w, s in enumerate(range(0, T, L)):
            e = min(s + L, T)
            ctx = self.context(s, e, doc_ids, reset, device)
            h = model.embed(input_ids[:, s:e])
            h, caches = model.run_blocks(model.prelude_idx, h, caches, ctx)
            start_short = [caches[i].short_term() for i in model.core_idx]
            core_input = h
            last = e >= T  # the last window does not sleep: its wake pass is the step's last region
            h, caches = self.core_pass(h, caches, ctx, last=last)
            forwards += 1
            logits, caches, wsum = self.wake_head_loss(h, caches, ctx, targets[:, s:e], tmask[:, s:e],
                                                       return_logits, counts[w], last=last)
            loss_sum = loss_sum + wsum
            wsums.append(wsum.detach())
            if logits is not None:
                logits_out.append(logits)
            used = 1
            if e < T:
                caches, used = self.end_window(h, caches, ctx, start_short, passes, core_input)
                forwards += used - 1
            passes_used.append(used)
            if e < T:
                caches = self.evict(caches)
        return loss_sum, wsums, passes_used, logits_out, caches, forwards


def window_target_counts(tmask: Tensor, window: int) -> list[int]:
    """Number of target tokens in each window of ``tmask`` [B, T] (one host sync for all windows)."""
    B, T = tmask.shape
    pad = -T % window
    padded = F.pad(tmask.to(torch.int64), (0, pad))
    return padded.view(B, -1, window).sum((0, 2)).tolist()


def sleep_forward(model: HybridLM, input_ids: Tensor, cfg: SleepConfig, loss_mask: Tensor | None = None,
                  doc_ids: Tensor | None = None, step: int | None = None, return_logits: bool = False,
                  caches: Caches | None = None, backend: str | None = None) -> SleepOutput:
    """Chunked sleep forward over ``input_ids`` [B, T]; see the module docstring."""
    return SleepRunner(model, cfg, backend)(input_ids, loss_mask, doc_ids, step, return_logits, caches)
