"""Memory bound: after 50 windows the session holds no tensor whose size grows with tokens seen.

Every tensor reachable from the session object (its caches, window buffers, anything else, the model's
weights excluded) is found by walking its attributes, and its shape and the bytes of the storage behind
it are recorded after every call. The feeding schedule (steps, and a prefill crossing a boundary every
7th window) repeats every 7 windows; from window 7 on, each (window, phase) must show exactly the
tensors and sizes it showed 7 windows earlier.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest
import torch
from torch import nn

from megasleep.inference import Session
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


def reachable_tensors(obj, path="session", out=None, seen=None):
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        out[path] = obj
        return out
    if isinstance(obj, nn.Module) or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return out
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, deque, set)):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return out
    for k, v in items:
        reachable_tensors(v, f"{path}.{k}", out, seen)
    return out


def signature(sess):
    ts = reachable_tensors(sess)
    return sorted((p, tuple(t.shape), t.untyped_storage().nbytes()) for p, t in ts.items()), ts


def run_windows(sess, L, windows, seed=0, prefill_every=0):
    """Steps (and now and then a multi-token prefill) through ``windows`` windows; the signature at
    every token boundary, keyed by (window, phase)."""
    g = torch.Generator().manual_seed(seed)
    sigs, t = {}, 0
    while t < windows * L:
        n = 1
        if prefill_every and (t // L) % prefill_every == 1 and t % L == 1:
            n = L + 2                                  # a prefill crossing a boundary now and then
        ids = torch.randint(0, 61, (sess.batch, n), generator=g)
        sess.feed(ids, logits="last")
        t += n
        sigs.setdefault((t // L, t % L), signature(sess))
    return sigs


@pytest.mark.parametrize("eviction,passes,adaptive", [("hard", 1, None), ("sliding", 1, None), ("hard", 3, None),
                                                      ("sliding", 3, None), ("sliding", 4, 0.05)])
def test_no_held_tensor_grows_over_50_windows(eviction, passes, adaptive):
    model = tiny_model("MAGMA", n_prelude=1, n_coda=1)
    L = 4
    sess = Session(model, window=L, passes=passes, eviction=eviction, adaptive_tol=adaptive, batch=2, log_size=16)
    sigs = run_windows(sess, L, 50, prefill_every=7)
    assert sess.position >= 50 * L
    compared = 0
    for (w, phase), (sig, _) in sigs.items():
        if w >= 14:
            assert sig == sigs[w - 7, phase][0], f"held tensors changed at window {w} phase {phase}"
            compared += 1
    assert compared > 100
    # what the session reports it holds is everything it holds, and its size is bounded by L
    sig, ts = signature(sess)
    held = {t.untyped_storage().data_ptr() for t in sess.held_tensors().values()}
    assert {t.untyped_storage().data_ptr() for t in ts.values()} <= held
    widest = max(max(p.shape) for p in model.parameters())          # no dim beyond a model width or L
    for p, t in ts.items():
        assert max(t.shape, default=0) <= max(L, widest), (p, tuple(t.shape))
    assert len(sess.sleep_log) == 16                 # the per-window log is bounded too
    assert sess.sleeps == (sess.position // L if passes > 1 else 0)


def test_check_detects_growth_in_a_never_evicting_session():
    """The same walk does see the KV cache grow when the window never ends (not a vacuous test)."""
    model = tiny_model("AGMA")
    sess = Session(model, window=10_000, passes=1, batch=1)
    sizes = []
    for _ in range(3):
        sess.feed(torch.randint(0, 61, (1, 40)), logits="none")
        sizes.append(sum(t.untyped_storage().nbytes() for t in reachable_tensors(sess).values()))
    assert sizes[0] < sizes[1] < sizes[2]
    assert sess.state_bytes() == sizes[2]
