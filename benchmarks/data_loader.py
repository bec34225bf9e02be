#!/usr/bin/env python
"""Loader throughput vs. the tiny model's training throughput (goal: loader >= 20x training).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_loader.py            # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/data_loader.py --workers 2 --seconds 10 --json results/data_loader.json

1. builds tiny datasets in a temporary directory (or ``--data-dir``): the demo's own Rule-110 shards
   (``megasleep demo``: one 24-bit string, t in 0-3, built by the demo's code), Rule 110 task shards
   (T = 101) and text shards (a synthetic Zipf corpus, sentencepiece vocab 512, T = 1024);
2. loader tokens/s: ``build_loader`` with ``--workers`` workers, shuffle buffer 1000, repeating
   epochs, timed over ``--seconds`` after a warm-up (tokens = batch x padded length). The ``demo``
   row uses the demo's own loader settings instead (0 workers: the loader runs in the training
   process, shuffle buffer 200, 32 sequences per rank);
3. training tokens/s of the tiny model (``configs/models/tiny.yaml``, sleep_forward + backward +
   AdamW) on batches of the same shape (the ``demo`` row: the demo's L = 24 at N = 1, the faster of its two runs). megasleep.models / megasleep.sleep are imported lazily; if
   they are not there yet the line says "model not available yet".
4. for the ``demo`` row, the loader's cost per sample split into tar reading, decoding + validation
   and the whole loader (0 workers, the demo's settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_data(d: Path, n_task: int, n_docs: int) -> dict[str, dict]:
    import numpy as np

    from megasleep import demo
    from megasleep.data.shards import build_task_split, build_text_dataset
    from megasleep.data.tasks import get_task
    from megasleep.data.tokenizer import train_tokenizer

    out = {"demo": {"path": str(demo.build_shards(d / "demo", n_task, 64) / "train"), "batch_size": 32,
                    "seq_len": None, "window": 24, "passes": 1, "workers": 0, "shuffle_buffer": 200}}
    if not (d / "rule110" / "manifest.json").exists():
        tok = get_task("rule110").make_task_tokenizer(d / "tok")
        build_task_split("rule110", d / "rule110", "train", n_task, seed=0, difficulties="1-32", tokenizer=tok.path,
                         shard_size=1000, workers=2, progress=False)
    out["rule110"] = {"path": str(d / "rule110"), "batch_size": 64, "seq_len": None, "window": 24}
    if not (d / "text" / "manifest.json").exists():
        rng = np.random.default_rng(0)
        syl = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "er", "is", "ol", "um", "ba", "ce",
               "fi", "gu", "ha"]
        vocab = sorted({"".join(syl[j] for j in rng.integers(0, len(syl), size=int(rng.integers(1, 4))))
                        for _ in range(4000)})
        p = 1.0 / np.arange(1, len(vocab) + 1)
        p /= p.sum()
        with open(d / "corpus.jsonl", "w") as f:
            for _ in range(n_docs):
                words = rng.choice(len(vocab), size=int(rng.integers(50, 3000)), p=p)
                f.write(json.dumps({"text": " ".join(vocab[i] for i in words)}) + "\n")
        tok = train_tokenizer(d / "tok" / "text", corpus=d / "corpus.jsonl", vocab_size=512, num_threads=2)
        build_text_dataset(d / "corpus.jsonl", d / "text", tok.path, 1024, shard_size=200, workers=2, progress=False)
    out["text"] = {"path": str(d / "text"), "batch_size": 8, "seq_len": 1024, "window": 256}
    return out


def loader_tokens_per_s(spec: dict, workers: int, seconds: float) -> dict:
    from megasleep.data.loader import build_loader

    loader = build_loader({"datasets": [spec["path"]], "batch_size": spec["batch_size"], "seq_len": spec["seq_len"],
                           "num_workers": spec.get("workers", workers),
                           "shuffle_buffer": spec.get("shuffle_buffer", 1000), "seed": 0})
    it = iter(loader)
    for _ in range(5):  # warm-up: worker start, shuffle-buffer fill
        next(it)
    tokens = batches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        tokens += b["input_ids"].numel()
        batches += 1
    dt = time.perf_counter() - t0
    del it
    return {"tokens_per_s": tokens / dt, "batches": batches, "batch_shape": list(b["input_ids"].shape),
            "seconds": dt, "workers": spec.get("workers", workers)}


def per_sample_split(spec: dict, seconds: float) -> dict:
    """Microseconds per sample of the loader's parts on one dataset, in one process: webdataset's tar
    reading over (up to) three shards, decoding + validation of the same samples, the whole loader
    with the spec's settings."""
    import webdataset as wds

    from megasleep.data.block import iter_samples, sample_count
    from megasleep.data.manifest import resolve_shards

    urls, _ = resolve_shards(spec["path"])
    t = time.perf_counter()
    raws = [r for u in urls[:3] for r in wds.tarfile_to_samples()([{"url": u}])]
    tar_s = time.perf_counter() - t
    n = sum(sample_count(r) for r in raws)
    t = time.perf_counter()
    for _ in iter_samples(raws):
        pass
    decode_s = time.perf_counter() - t
    whole = loader_tokens_per_s(spec, 0, seconds)
    return {"tar_us": tar_s / n * 1e6, "decode_us": decode_s / n * 1e6, "tar_keys": len(raws), "samples": n,
            "loader_us": whole["seconds"] / (whole["batches"] * spec["batch_size"]) * 1e6}


def model_tokens_per_s(spec: dict, steps: int) -> dict:
    """Training tokens/s of the tiny model on batches shaped like the loader's (lazy imports)."""
    try:
        import torch

        from megasleep.models import build_model, load_model_config
        from megasleep.sleep import SleepConfig, sleep_forward
    except Exception as exc:  # the model packages are built in parallel with this one
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
    try:
        from megasleep.data.loader import build_loader

        cfg = load_model_config(ROOT / "configs" / "models" / "tiny.yaml")
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sleep_cfg = SleepConfig(window=spec["window"], passes=spec.get("passes", 1), eviction="hard")
        loader = build_loader({"datasets": [spec["path"]], "batch_size": spec["batch_size"],
                               "seq_len": spec["seq_len"], "num_workers": 0, "shuffle_buffer": 0})
        batch = next(iter(loader))
        ids = batch["input_ids"].clamp_max(cfg.vocab_size - 1)
        model.train()
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            out = sleep_forward(model, ids, sleep_cfg, loss_mask=batch["loss_mask"], doc_ids=batch["doc_ids"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        dt = sum(times[1:]) / steps  # first step excluded (allocations)
        return {"available": True, "tokens_per_s": ids.numel() / dt, "step_s": dt, "params": sum(
            p.numel() for p in model.parameters()), "batch_shape": list(ids.shape)}
    except Exception as exc:
        return {"available": False, "reason": f"model side failed: {type(exc).__name__}: {exc}"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="timed loader window per dataset")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per dataset")
    p.add_argument("--data-dir", help="reuse / keep the generated datasets here (default: a temp dir)")
    p.add_argument("--task-samples", type=int, default=20000)
    p.add_argument("--text-docs", type=int, default=1500)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    tmp = None
    if a.data_dir:
        d = Path(a.data_dir)
        d.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="megasleep-bench-")
        d = Path(tmp.name)
    t0 = time.time()
    specs = build_data(d, a.task_samples, a.text_docs)
    print(f"# data ready in {time.time() - t0:.1f}s under {d}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    results = {}
    for name, spec in specs.items():
        lo = loader_tokens_per_s(spec, a.workers, a.seconds)
        mo = model_tokens_per_s(spec, a.steps)
        results[name] = {"loader": lo, "model": mo}
        line = (f"{name:8s} loader ({lo['workers']} workers, batch {lo['batch_shape']}): "
                f"{lo['tokens_per_s']:12,.0f} tokens/s")
        if mo["available"]:
            ratio = lo["tokens_per_s"] / mo["tokens_per_s"]
            line += (f" | tiny model training ({mo['params']:,} params, batch {mo['batch_shape']}): "
                     f"{mo['tokens_per_s']:10,.0f} tokens/s | loader/training = {ratio:.1f}x "
                     f"({'ok' if ratio >= 20 else 'BELOW the 20x goal'})")
        else:
            line += f" | model not available yet ({mo['reason']})"
        print(line, flush=True)
        if name == "demo":
            sp = per_sample_split(spec, min(a.seconds, 4.0))
            results[name]["per_sample"] = sp
            print(f"# demo per sample: tar reading {sp['tar_us']:.1f} us ({sp['samples']} samples in {sp['tar_keys']} "
                  f"tar keys), decode + validate {sp['decode_us']:.1f} us, whole loader {sp['loader_us']:.1f} us",
                  flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
