"""Sessions restored from one saved state are independent: the sleep-feature buffer (written in place
while a window fills) is not shared with the state dict or with another restored session."""

from __future__ import annotations

import pytest
import torch

from megasleep.inference import Session
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")
TOL = dict(rtol=1e-10, atol=1e-11)


def _ids(seed: int, T: int) -> torch.Tensor:
    return torch.randint(0, 61, (1, T), generator=torch.Generator().manual_seed(seed))


def test_two_sessions_restored_from_one_state_dict_stay_independent():
    model = tiny_model("MAGMA", n_prelude=1, n_coda=1)
    cfg = SleepConfig(window=4, passes=3, eviction="hard")
    a, b = _ids(1, 14), _ids(2, 14)
    b[:, :6] = a[:, :6]  # shared prefix ending mid-window, then different tokens past window ends
    ref_a = sleep_forward(model, a, cfg, return_logits=True).logits
    ref_b = sleep_forward(model, b, cfg, return_logits=True).logits
    s = Session(model, cfg)
    s.feed(a[:, :6])
    sd = s.state_dict()  # one checkpoint, kept in memory
    u = Session(model, cfg).load_state_dict(sd)
    v = Session(model, cfg).load_state_dict(sd)
    # u runs past the window end first: it must not change what v (or sd) holds
    torch.testing.assert_close(u.feed(a[:, 6:]), ref_a[:, 6:], **TOL)
    torch.testing.assert_close(v.feed(b[:, 6:]), ref_b[:, 6:], **TOL)
    # the live session moving on does not change the state dict taken earlier either
    s.feed(a[:, 6:])
    w = Session(model, cfg).load_state_dict(sd)
    torch.testing.assert_close(w.feed(b[:, 6:]), ref_b[:, 6:], **TOL)
