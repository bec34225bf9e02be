"""lm-evaluation-harness model ``megasleep``: a sleeping HybridLM behind lm_eval's LM API.

    python -m megasleep.eval.lm_eval_cli --model megasleep \\
        --model_args pretrained=DIR,passes=4,window=2048,eviction=hard --tasks ...

(``megasleep eval lm-eval ...`` is the same.) lm_eval 0.4.13 discovers models only through its own
registry (``lm_eval.models.MODEL_MAPPING`` plus ``@register_model`` at import time; it does not scan
entry points), so the wrapper imports this module (which registers the class) and then runs lm_eval's
own command line unchanged. In Python: ``import megasleep.eval.lm_eval_adapter`` then
``lm_eval.simple_evaluate(model="megasleep", model_args=...)``.

model_args: ``pretrained`` (exported dir or mamba_ssm dir), ``passes`` (N, default: the
checkpoint's training N, else 1), ``window`` (L, default: the checkpoint's, else 2048), ``eviction``
(hard | sliding), ``adaptive_tol``, ``tokenizer`` (default: the checkpoint's tokenizer.model),
``dtype``, ``device``, ``batch_size``, ``max_gen_toks`` (256), ``add_bos_token`` (true). Any other
key is an error that names it (a typo such as ``passe=4`` must not silently run at another N; the old
``sleep_passes`` is answered with its new name);
``device=cuda...`` on a machine without CUDA is an error too (the wrapper passes ``--device cpu``
there when no device is given, so that the results JSON records the device really used).

Requests go through the same chunked sleep forward as training (windows of L tokens, N passes before
each eviction), so there is no maximum length: ``loglikelihood_rolling`` scores a whole document in one
forward (BOS-prefixed, every token predicted once), ``loglikelihood`` scores [BOS] + context +
continuation, and ``generate_until`` decodes greedily, re-running the sleep forward per new token.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


@register_model("megasleep")
class MegasleepLM(TemplateLM):
    def __init__(self, pretrained: str, passes: int | None = None, window: int | None = None,
                 eviction: str | None = None, adaptive_tol: float | None = None, tokenizer: str | None = None,
                 dtype: str = "float32", device: str | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, max_gen_toks: int = 256, add_bos_token: bool = True,
                 trust_remote_code: bool | None = None, **kwargs):
        # trust_remote_code: lm_eval's --trust_remote_code adds it; our checkpoints run no remote code
        if kwargs:
            raise ValueError(unknown_args_message(sorted(kwargs)))
        super().__init__()
        from megasleep.checkpoint.load import load_pretrained
        from megasleep.checkpoint.released import tokenizer_path
        from megasleep.data.tokenizer import load_tokenizer
        from megasleep.eval.harness import CollectingRunner
        from megasleep.inference.checkpoint import trained_forward_switches
        from megasleep.sleep.config import SleepConfig

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"megasleep lm_eval model: device={device} but CUDA is not available on this machine; "
                             "pass --device cpu")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._device = dev
        self.model = load_pretrained(pretrained, device=dev, dtype=dtype)
        meta = getattr(self.model, "pretrained_meta", {}) or {}
        trained = meta.get("sleep") or {}
        tok = Path(tokenizer) if tokenizer else tokenizer_path(pretrained)
        if tok is None:
            raise ValueError(f"{pretrained}: no tokenizer.model in the checkpoint; pass tokenizer=PATH in model_args")
        self.tok = load_tokenizer(tok)
        if self.tok.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"tokenizer {tok} has {self.tok.vocab_size} pieces but the model only "
                             f"{self.model.config.vocab_size} embeddings")
        self.sleep = SleepConfig(window=int(window or trained.get("window") or 2048),
                                 passes=int(passes or trained.get("passes") or 1),
                                 eviction=eviction or trained.get("eviction") or "hard",
                                 adaptive_tol=adaptive_tol, checkpoint=False, **trained_forward_switches(trained))
        self.runner = CollectingRunner(self.model, self.sleep)
        bs = str(batch_size if batch_size is not None else 1)
        self.batch_size = 1 if bs.startswith("auto") else max(1, int(bs))  # "auto" is not supported: 1
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.pretrained = str(pretrained)

    # ---- tokenizer side ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"megasleep-spm-{self.tok.hash[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def get_model_info(self) -> dict:
        return {"megasleep_pretrained": self.pretrained, "sleep": self.sleep.model_dump(mode="json"),
                "tokenizer_hash": self.tok.hash, "model_num_parameters": self.model.num_parameters()}

    # ---- scoring ----------------------------------------------------------------------------------
    def _score(self, seqs: list[list[int]], starts: list[int]) -> list[tuple[float, bool]]:
        """(sum log p, all greedy) of tokens seqs[i][starts[i]:] given what precedes them."""
        out: list[tuple[float, bool] | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        dev = self._device
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.zeros((len(idx), T), dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.bool)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, starts[i]:len(seqs[i])] = True
            self.runner.reset()
            with torch.no_grad():
                self.runner(ids.to(dev), mask.to(dev))
            preds, ces = self.runner.collected()
            preds, ces = preds.cpu(), ces.cpu()
            for r, i in enumerate(idx):
                pos = torch.arange(starts[i], len(seqs[i]))
                lp = -float(ces[r, pos - 1].double().sum())
                greedy = bool((preds[r, pos - 1] == ids[r, pos]).all())
                out[i] = (lp, greedy)
        return out  # type: ignore[return-value]

    def _with_bos(self, ctx: list[int]) -> list[int]:
        bos = self.prefix_token_id
        if self.add_bos_token and (not ctx or ctx[0] != bos):
            return [bos, *ctx]
        return list(ctx)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        seqs, starts = [], []
        for _, ctx, cont in requests:
            ctx = self._with_bos(ctx)
            seqs.append(ctx + list(cont))
            starts.append(len(ctx))
        res = []
        step = max(1, self.batch_size * 8)
        bar = tqdm(total=len(seqs), disable=disable_tqdm, desc="megasleep loglikelihood")
        for b in range(0, len(seqs), step):
            res.extend(self._score(seqs[b:b + step], starts[b:b + step]))
            bar.update(min(step, len(seqs) - b))
        bar.close()
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        seqs, starts = [], []
        for (string,) in [req.args for req in requests]:
            ids = self.tok_encode(string)
            seqs.append([self.prefix_token_id, *ids])
            starts.append(1)
        res = []
        for b in tqdm(range(0, len(seqs), self.batch_size), disable=disable_tqdm, desc="megasleep rolling"):
            res.extend(lp for lp, _ in self._score(seqs[b:b + self.batch_size], starts[b:b + self.batch_size]))
        for req, lp in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), lp)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megasleep.eval.harness import greedy_stream

        try:
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
        except ImportError:  # lm_eval < 0.4.10
            def normalize_gen_kwargs(kw, default):
                kw = dict(kw)
                kw["max_gen_toks"] = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", default)))
                return kw

            def handle_stop_sequences(until, eos):
                until = [until] if isinstance(until, str) else list(until or [])
                return until + ([eos] if eos and eos not in until else [])

        results: list[str] = []
        for req in tqdm(requests, disable=disable_tqdm, desc="megasleep generate_until"):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kw.get("do_sample") and float(kw.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the megasleep lm_eval model decodes greedily; do_sample=True is not supported")
            until = handle_stop_sequences(kw.get("until"), eos=self.tok.decode([self.eot_token_id]) or None)
            until = [u for u in until if u]
            prompt = self._with_bos(self.tok_encode(context))
            gen: list[int] = []
            text = ""
            for tok in greedy_stream(self.model, self.sleep, prompt, int(kw["max_gen_toks"])):
                if tok == self.eot_token_id:
                    break
                gen.append(tok)
                text = self.tok.decode(gen)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


# model_args renamed: the old key is an error naming the new one (an int N is `passes` everywhere)
RENAMED = {"sleep_passes": "passes"}


def unknown_args_message(unknown: list[str]) -> str:
    """One line naming the unknown model_args, with the closest known name of each."""
    known = [k for k in inspect.signature(MegasleepLM.__init__).parameters if k not in ("self", "kwargs")]
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1)
        hint = f" (renamed {RENAMED[k]!r})" if k in RENAMED else f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{k!r}{hint}")
    return (f"megasleep lm_eval model: unknown model_args {', '.join(parts)}; known: {', '.join(known)}")


__all__ = ["MegasleepLM", "unknown_args_message"]
