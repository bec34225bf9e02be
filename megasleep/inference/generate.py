"""Generation on top of :class:`~megasleep.inference.session.Session`: batches of prompts of any
lengths, temperature / top-k / top-p / eos / seed, streamed token by token.

Rows of one session share absolute positions (hence window boundaries and the attention context
positions), so prompts are grouped by length: each group is one batched session, and the groups
advance in lock-step, one token each per round. Finished rows (eos) are dropped from their session.
Sampling uses one random generator per prompt, seeded from ``(seed, prompt index)``, so a prompt's
output does not depend on which other prompts share the batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megasleep.inference.sampling import check_sampling, sample_next
from megasleep.inference.session import Session, make_sleep_config
from megasleep.models.hybrid import HybridLM
from megasleep.sleep import SleepConfig


@dataclass(frozen=True)
class TokenEvent:
    prompt: int        # index of the prompt this token continues
    token: int
    index: int         # 0 for the first generated token of that prompt
    finished: bool     # last token for that prompt (eos, or max_new_tokens reached)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0               # tokens run through session.step (one per row per step)
    decode_seconds: float = 0.0          # time inside session.step (includes sleeps triggered by steps)
    sleep_seconds: float = 0.0           # all sleeps (prefill and decode)
    decode_sleep_seconds: float = 0.0    # the sleeps triggered by decode steps
    sleeps: int = 0
    passes_used: list[int] = field(default_factory=list)   # per slept window (in the sessions' logs)
    state_bytes: int = 0                 # bytes held by the sessions at the end (all groups)
    sessions: int = 0

    @property
    def awake_tokens_per_s(self) -> float:
        """Tokens per second through wake decode steps, sleep time excluded."""
        t = self.decode_seconds - self.decode_sleep_seconds
        return self.decode_tokens / t if t > 0 else float("nan")


def normalize_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """A prompt (list of ids / 1-D tensor) or a batch of them -> list of lists, checked."""
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(p, int) for p in prompts):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, Tensor) else list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not isinstance(t, int) or t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids must be integers in [0, {vocab_size}) for this model, "
                             f"got {bad[:5]}")
        out.append([int(t) for t in p])
    return out


class TokenStream:
    """Iterator of :class:`TokenEvent`; ``stats`` is up to date after each event."""

    def __init__(self, model: HybridLM, prompts, max_new_tokens: int, sleep: SleepConfig, temperature: float,
                 top_k: int | None, top_p: float | None, eos_id: int | Sequence[int] | None, seed: int | None,
                 device, backend: str | None):
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.model, self.sleep = model, sleep
        self.prompts = normalize_prompts(prompts, model.config.vocab_size)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.eos = set() if eos_id is None else ({int(eos_id)} if isinstance(eos_id, int) else set(map(int, eos_id)))
        self.seed, self.device, self.backend = seed, device, backend
        self.stats = GenerationStats(prompt_tokens=sum(map(len, self.prompts)))
        self.sessions: list[Session] = []
        self._it = self._run()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._it)

    def _generator(self, i: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed((int(self.seed) * 1_000_003 + i) % (2**63))

    def _refresh(self) -> None:
        s = self.stats
        s.sleeps = sum(x.sleeps for x in self.sessions)
        s.sleep_seconds = sum(x.sleep_seconds for x in self.sessions)
        s.passes_used = [r.passes_used for x in self.sessions if x.sleeps for r in x.sleep_log]
        s.state_bytes = sum(x.state_bytes() for x in self.sessions)
        s.sessions = len(self.sessions)

    def _run(self) -> Iterator[TokenEvent]:
        model = self.model
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(self.prompts):
            by_len.setdefault(len(p), []).append(i)
        gens = [self._generator(i) for i in range(len(self.prompts))]
        groups = []   # [session, prompt indices still alive, logits [b, V]]
        for _, rows in sorted(by_len.items()):
            sess = Session(model, self.sleep, batch=len(rows), device=self.device, backend=self.backend)
            self.sessions.append(sess)
            t0 = time.perf_counter()
            logits = sess.prefill(torch.tensor([self.prompts[i] for i in rows]), logits="last")
            self.stats.prefill_seconds += time.perf_counter() - t0
            groups.append([sess, rows, logits])
        self._refresh()
        for t in range(self.max_new_tokens):
            last_round = t == self.max_new_tokens - 1
            for g in groups:
                sess, rows, logits = g
                if not rows:
                    continue
                toks, keep = [], []
                for r, i in enumerate(rows):
                    tok = sample_next(logits[r], self.temperature, self.top_k, self.top_p, gens[i])
                    done = last_round or tok in self.eos
                    self.stats.generated_tokens += 1
                    yield TokenEvent(i, tok, t, done)
                    if not done:
                        toks.append(tok)
                        keep.append(r)
                if not keep:
                    g[1] = []
                    continue
                if len(keep) < len(rows):
                    sess.select(keep)
                    g[1] = [rows[r] for r in keep]
                slept = sess.sleep_seconds
                t0 = time.perf_counter()
                g[2] = sess.step(torch.tensor(toks))
                self.stats.decode_seconds += time.perf_counter() - t0
                self.stats.decode_tokens += len(toks)
                self.stats.decode_sleep_seconds += sess.sleep_seconds - slept
            self._refresh()
            if not any(g[1] for g in groups):
                break
        self._refresh()


def generate_stream(model: HybridLM, prompts, max_new_tokens: int, *, sleep: SleepConfig | None = None,
                    window: int | None = None, passes: int | None = None, eviction: str | None = None,
                    adaptive_tol: float | None = None, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | Sequence[int] | None = None, seed: int | None = None,
                    device=None, backend: str | None = None) -> TokenStream:
    """Stream generated tokens (a :class:`TokenStream` of :class:`TokenEvent`) for one prompt or a
    batch of prompts of any lengths. ``temperature=0`` is greedy; a prompt stops at ``eos_id`` (the
    eos token is emitted) or after ``max_new_tokens``. Prompts are checked before anything runs."""
    cfg = make_sleep_config(sleep, window=window, passes=passes, eviction=eviction, adaptive_tol=adaptive_tol)
    return TokenStream(model, prompts, max_new_tokens, cfg, temperature, top_k, top_p, eos_id, seed, device, backend)


@dataclass
class GenerateResult:
    tokens: list[list[int]]      # generated ids per prompt (eos included when hit)
    stats: GenerationStats


def generate(model: HybridLM, prompts, max_new_tokens: int, **kw) -> GenerateResult:
    """Like :func:`generate_stream`, collected: ``GenerateResult(tokens per prompt, stats)``."""
    stream = generate_stream(model, prompts, max_new_tokens, **kw)
    out: list[list[int]] = [[] for _ in stream.prompts]
    for ev in stream:
        out[ev.prompt].append(ev.token)
    return GenerateResult(out, stream.stats)
