"""Streaming wake/sleep session: token-by-token wake decoding, sleep whenever a window fills, memory
bounded by one window whatever the number of tokens seen.

What: a :class:`Session` serves a batch of sequences that advance together (same window boundaries);
it holds per layer the :class:`~megasleep.models.cache.LayerCache` (fast weights ``S``, conv state,
at most ``L-1`` keys/values) and, for the current window and only when ``N > 1``, the core's wake-pass
features ``[B, L, d]``, the core's short-term memory as the window started and (with ``reinject`` /
``feedback_norm``) the window's core input. ``feed`` / ``prefill`` run tokens chunk-parallel, ``step``
one token on the mixers' recurrent path; a filled window sleeps at once through
:meth:`megasleep.sleep.SleepRunner.end_window`, then evicts.
Contract: the logits equal those of :func:`megasleep.sleep.sleep_forward` over the same tokens, whatever
mix of ``feed`` and ``step`` produced them (tests/inference/test_parity.py).
Why one sleep implementation: the session calls the training loop's, so it cannot drift from it.
Doc: docs/inference.md.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.hybrid import Caches, HybridLM
from megasleep.sleep import SleepConfig, SleepRunner

LOGITS_MODES = ("all", "last", "none")


@dataclass(frozen=True)
class SleepRecord:
    """One sleep: the window it consolidated (index from 0), passes run (1 wake + sleep passes), seconds."""

    window: int
    passes_used: int
    seconds: float


def make_sleep_config(sleep: SleepConfig | None = None, *, window: int | None = None, passes: int | None = None,
                      eviction: str | None = None, adaptive_tol: float | None = None) -> SleepConfig:
    """A SleepConfig from an existing one and/or keyword settings, with plain error messages."""
    if passes is not None and int(passes) < 1:
        raise ValueError(f"sleep passes N must be >= 1 (N = 1 means no sleep), got {passes}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window L must be >= 1 token, got {window}")
    if eviction is not None and eviction not in ("hard", "sliding"):
        raise ValueError(f"eviction must be 'hard' or 'sliding', got {eviction!r}")
    if adaptive_tol is not None and not adaptive_tol > 0:
        raise ValueError(f"adaptive_tol must be > 0, got {adaptive_tol}")
    if sleep is None:
        if window is None:
            raise ValueError("give a SleepConfig or at least window=L")
        return SleepConfig(window=window, passes=1 if passes is None else passes, eviction=eviction or "hard",
                           adaptive_tol=adaptive_tol, checkpoint=False)
    upd = {k: v for k, v in dict(window=window, passes=passes, eviction=eviction,
                                 adaptive_tol=adaptive_tol).items() if v is not None}
    return sleep.model_copy(update=upd) if upd else sleep


def _as_ids(ids, batch: int | None, device) -> Tensor:
    """list[int] | list[list[int]] | 1-D | 2-D tensor -> LongTensor [B, T] on ``device``."""
    if not isinstance(ids, Tensor):
        ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    ids = ids.to(device=device, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None] if batch in (None, 1) else ids[:, None]  # [T] for B=1, or one token per row
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [batch, time] (or [time] / [batch] for one row / one step), "
                         f"got shape {tuple(ids.shape)}")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"this session serves {batch} sequence(s); got ids for {ids.shape[0]}")
    return ids


def _compact(c: LayerCache) -> LayerCache:
    """Copy out tensors that are views into a larger buffer (a chunked op's final conv state is a slice
    of its whole padded input, an SSM final state a slice of all chunk states, cached keys a slice of
    cache + new keys): what stays held is then exactly the state's own size."""

    def own(t):
        return t.clone() if t is not None and t.untyped_storage().nbytes() > t.numel() * t.element_size() else t

    return LayerCache(ssm=own(c.ssm), conv=None if c.conv is None else tuple(own(t) for t in c.conv),
                      k=own(c.k), v=own(c.v), pos=own(c.pos), doc=own(c.doc))


class Session:
    """Streaming wake/sleep state of ``batch`` sequences for ``model`` under one SleepConfig.

    ``Session(model, window=L, passes=N, eviction="hard"|"sliding", adaptive_tol=None, batch=B)`` or
    ``Session(model, SleepConfig(...), batch=B)``. Call :meth:`feed` / :meth:`prefill` with ``[B, T]``
    ids and :meth:`step` with ``[B]`` ids; both return logits. ``sleep_log`` holds the last
    ``log_size`` :class:`SleepRecord` s; ``sleeps`` / ``sleep_passes`` / ``sleep_seconds`` count all.
    """

    def __init__(self, model: HybridLM, sleep: SleepConfig | None = None, *, window: int | None = None,
                 passes: int | None = None, eviction: str | None = None, adaptive_tol: float | None = None,
                 batch: int = 1, device=None, backend: str | None = None, prefill_chunk: int = 2048,
                 log_size: int = 1024):
        cfg = make_sleep_config(sleep, window=window, passes=passes, eviction=eviction, adaptive_tol=adaptive_tol)
        if cfg.passes < 1:
            raise ValueError(f"sleep passes N must be >= 1, got {cfg.passes}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.cfg = model, cfg
        self.window, self.passes, self.eviction = cfg.window, cfg.passes, cfg.eviction
        self.batch = batch
        self.device = torch.device(device) if device is not None else model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.runner = SleepRunner(model, cfg, backend)
        self.backend = self.runner.backend
        self.prefill_chunk = prefill_chunk
        self.position = 0                                  # tokens seen (absolute position of the next one)
        self.sleeps, self.sleep_passes, self.sleep_seconds = 0, 0, 0.0
        self.sleep_log: deque[SleepRecord] = deque(maxlen=log_size)
        self.caches: Caches = model.init_caches(batch, self.device, self.dtype)
        # zero short-conv states to restart from after a hard eviction, so that the first token of a
        # window also takes the recurrent step path (zeros == no history; the tensors are never written)
        self._conv0: list[tuple[Tensor, ...] | None] = [c.conv for c in self.caches]
        self._sleeps = cfg.passes > 1 and len(model.core_idx) > 0
        self._start_short: list[LayerCache] | None = None
        self._feats: Tensor | None = None
        if self._sleeps:
            self._feats = torch.zeros(batch, cfg.window, model.config.d_model, device=self.device, dtype=self.dtype)
        # the window's core input (the prelude's output, what entered the core on the wake pass): the sleep
        # remedies reinject / feedback_norm feed it into every sleep pass, so it is kept only for them
        self._core_in: Tensor | None = None
        if self._sleeps and (cfg.reinject or cfg.feedback_norm):
            self._core_in = torch.zeros_like(self._feats)

    # ---- public API -----------------------------------------------------------------------------
    @property
    def window_offset(self) -> int:
        """Tokens of the current (unfinished) window already seen."""
        return self.position % self.window

    @torch.no_grad()
    def feed(self, ids, logits: str = "all") -> Tensor | None:
        """Run tokens ``ids`` ``[B, T]``; returns logits ``[B, T, V]`` ("all"), ``[B, V]`` of the last
        token ("last") or None ("none"). Chunk-parallel, cut at window boundaries (and every
        ``prefill_chunk`` tokens); sleeps at every boundary reached."""
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
        ids = _as_ids(ids, self.batch, self.device)
        T = ids.shape[1]
        if T == 0:
            raise ValueError("empty prompt: give at least one token")
        self.model.check_ids(ids)
        out, s = [], 0
        while s < T:
            n = min(T - s, self.window - self.window_offset, self.prefill_chunk)
            last = s + n == T
            want = logits == "all" or (logits == "last" and last)
            lg = self._run(ids[:, s:s + n], "all" if logits == "all" else ("last" if want else "none"))
            if lg is not None:
                out.append(lg)
            s += n
        if logits == "none":
            return None
        return torch.cat(out, 1) if logits == "all" else out[-1]

    prefill = feed

    def step(self, ids) -> Tensor:
        """One token per row (``[B]`` or ``[B, 1]``): returns its logits ``[B, V]``."""
        ids = _as_ids(ids, self.batch, self.device)
        if ids.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got {ids.shape[1]}")
        return self.feed(ids, logits="last")

    def select(self, rows: Sequence[int] | Tensor) -> Session:
        """Keep only the sequences ``rows`` (in that order), e.g. to drop finished generations."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if idx.dim() != 1 or len(idx) == 0:
            raise ValueError("select needs a non-empty list of row indices")

        def sel(c: LayerCache) -> LayerCache:
            return LayerCache(ssm=None if c.ssm is None else c.ssm[idx],
                              conv=None if c.conv is None else tuple(t[idx] for t in c.conv),
                              k=None if c.k is None else c.k[idx], v=None if c.v is None else c.v[idx],
                              pos=c.pos, doc=None if c.doc is None else c.doc[idx])

        self.caches = [sel(c) for c in self.caches]
        self._conv0 = [None if c is None else tuple(t[idx] for t in c) for c in self._conv0]
        if self._start_short is not None:
            self._start_short = [sel(c) for c in self._start_short]
        if self._feats is not None:
            self._feats = self._feats[idx].contiguous()
        if self._core_in is not None:
            self._core_in = self._core_in[idx].contiguous()
        self.batch = len(idx)
        return self

    def state_dict(self) -> dict:
        """Everything the session holds, as plain containers of tensors (``torch.save``-able; no weights).

        A snapshot: the sleep-feature and core-input buffers, the tensors the session writes in place, are
        copied, so the dict does not change when the session runs on (the others are replaced, never written).
        """

        def cache(c: LayerCache) -> dict:
            return {f.name: getattr(c, f.name) for f in fields(c)}

        return {"position": self.position, "batch": self.batch, "window": self.window, "passes": self.passes,
                "eviction": self.eviction, "counters": (self.sleeps, self.sleep_passes, self.sleep_seconds),
                "sleep_log": [(r.window, r.passes_used, r.seconds) for r in self.sleep_log], "caches": [cache(c) for c in self.caches],
                "conv0": list(self._conv0),
                "start_short": None if self._start_short is None else [cache(c) for c in self._start_short],
                "feats": None if self._feats is None else self._feats.clone(),
                "core_in": None if self._core_in is None else self._core_in.clone()}

    def load_state_dict(self, sd: dict) -> Session:
        """Restore a :meth:`state_dict` of a session with the same window, passes and eviction."""
        mine = (self.window, self.passes, self.eviction)
        if (sd["window"], sd["passes"], sd["eviction"]) != mine:
            raise ValueError(f"state is for (L, N, eviction) = {(sd['window'], sd['passes'], sd['eviction'])}, "
                             f"this session is {mine}")
        core_in = sd.get("core_in")  # absent in states saved before the sleep remedies were streamed
        if (core_in is None) != (self._core_in is None):
            raise ValueError("state and session differ in sleep.reinject / sleep.feedback_norm (whether the "
                             "window's core input is kept)")
        dev = self.device

        def to(t):
            return t.to(dev) if isinstance(t, Tensor) else t

        def cache(d: dict) -> LayerCache:
            return LayerCache(**{k: (tuple(map(to, v)) if isinstance(v, (tuple, list)) else to(v))
                                 for k, v in d.items()})

        self.position, self.batch = int(sd["position"]), int(sd["batch"])
        self.sleeps, self.sleep_passes, self.sleep_seconds = sd["counters"]
        self.sleep_log = deque((SleepRecord(*r) for r in sd["sleep_log"]), maxlen=self.sleep_log.maxlen)
        self.caches = [cache(d) for d in sd["caches"]]
        self._conv0 = [None if c is None else tuple(map(to, c)) for c in sd["conv0"]]
        self._start_short = None if sd["start_short"] is None else [cache(d) for d in sd["start_short"]]
        # a copy: the buffer is written in place while a window fills, so sharing it with ``sd`` would let
        # two sessions restored from one state corrupt each other's sleep at the next window end
        self._feats = None if sd["feats"] is None else sd["feats"].to(dev, copy=True)
        self._core_in = None if core_in is None else core_in.to(dev, copy=True)
        return self

    def fork(self) -> Session:
        """An independent copy of this session (same model; state tensors copied), e.g. to branch."""
        import copy

        other = copy.copy(self)
        other.sleep_log = deque(self.sleep_log, maxlen=self.sleep_log.maxlen)
        sd = self.state_dict()
        sd = {**sd, "caches": [{k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else
                                    (v.clone() if isinstance(v, Tensor) else v)) for k, v in c.items()}
                               for c in sd["caches"]],
              "start_short": sd["start_short"]}  # state_dict / load_state_dict copy the feature buffer
        return other.load_state_dict(sd)

    def held_tensors(self) -> dict[str, Tensor]:
        """Every tensor the session holds between calls, by name (the model's weights excluded)."""
        out: dict[str, Tensor] = {}

        def add_cache(prefix: str, c: LayerCache) -> None:
            for f in fields(c):
                v = getattr(c, f.name)
                if isinstance(v, Tensor):
                    out[f"{prefix}.{f.name}"] = v
                elif isinstance(v, tuple):
                    for j, t in enumerate(v):
                        out[f"{prefix}.{f.name}{j}"] = t

        for i, c in enumerate(self.caches):
            add_cache(f"layer{i}", c)
        for i, c in enumerate(self._conv0):
            for j, t in enumerate(c or ()):
                out[f"layer{i}.conv_zero{j}"] = t
        if self._start_short is not None:
            for i, c in zip(self.model.core_idx, self._start_short):
                add_cache(f"window_start.layer{i}", c)
        if self._feats is not None:
            out["window_features"] = self._feats
        if self._core_in is not None:
            out["window_core_input"] = self._core_in
        return out

    def state_bytes(self) -> int:
        """Bytes of memory behind the held tensors (whole storages, each counted once)."""
        seen, total = set(), 0
        for t in self.held_tensors().values():
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        return total

    def stats(self) -> dict:
        return dict(tokens=self.position, windows_done=self.position // self.window, sleeps=self.sleeps,
                    sleep_passes=self.sleep_passes, sleep_seconds=self.sleep_seconds,
                    passes_used=[r.passes_used for r in self.sleep_log], state_bytes=self.state_bytes())

    # ---- internals ------------------------------------------------------------------------------
    def _ctx(self, start: int, end: int) -> MixContext:
        return MixContext.for_span(start, end, self.window, self.eviction, backend=self.backend, device=self.device)

    def _run(self, ids: Tensor, logits: str) -> Tensor | None:
        """Tokens that all fall inside the current window: prelude, core (wake pass), coda, head."""
        model, n, off = self.model, ids.shape[1], self.window_offset
        if self._sleeps and off == 0:
            self._start_short = [self.caches[i].short_term() for i in model.core_idx]
        ctx = self._ctx(self.position, self.position + n)
        h = model.embed(ids)
        h, caches = model.run_blocks(model.prelude_idx, h, self.caches, ctx)
        if self._core_in is not None:
            self._core_in[:, off:off + n] = h
        h, caches = model.run_blocks(model.core_idx, h, caches, ctx)
        if self._sleeps:
            self._feats[:, off:off + n] = h
        if logits == "none" and not model.coda_idx:
            out = None
        else:
            h, caches = model.run_blocks(model.coda_idx, h, caches, ctx)
            out = None if logits == "none" else model.head(h if logits == "all" else h[:, -1])
        # after a multi-token call, do not keep the call's buffers alive through views of them
        self.caches = caches if n == 1 else [_compact(c) for c in caches]
        self.position += n
        if off + n == self.window:
            self._end_window()
        return out

    def _end_window(self) -> None:
        """The window just filled: sleep (passes 2..N over its core features), then evict."""
        t0 = time.perf_counter()
        used = 1
        if self._sleeps:
            ctx = self._ctx(self.position - self.window, self.position)
            self.caches, used = self.runner.end_window(self._feats, self.caches, ctx, self._start_short,
                                                       self.passes, self._core_in)
            self._start_short = None
        caches = [_compact(c) for c in self.runner.evict(self.caches)]
        for i, c in enumerate(caches):
            if c.conv is None and self._conv0[i] is not None:
                caches[i] = LayerCache(ssm=c.ssm, conv=self._conv0[i], k=c.k, v=c.v, pos=c.pos, doc=c.doc)
        self.caches = caches
        dt = time.perf_counter() - t0
        self.sleeps += 1 if self._sleeps else 0
        self.sleep_passes += used
        self.sleep_seconds += dt
        self.sleep_log.append(SleepRecord(self.position // self.window - 1, used, dt))
