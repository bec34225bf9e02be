"""``megasleep generate``: stream tokens from a checkpoint with wake/sleep decoding.

    megasleep generate --checkpoint DIR --prompt "text" --passes 3 --window 512 --eviction hard

Tokens are printed as they come; at the end (on stderr) how many sleeps ran, the passes used per
window, tokens/s awake (decode time with sleep time taken out) and peak memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megasleep.renamed_options import refuse_renamed

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64", "fp64": "float64"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="HF-style directory: config.json, model.safetensors, optional tokenizer.model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-file", metavar="F", help="file whose whole text is the prompt")
    src.add_argument("--prompt-ids", metavar="IDS", help="raw token ids, comma or space separated")
    p.add_argument("--tokenizer", metavar="PATH", help="sentencepiece .model (default: DIR/tokenizer.model)")
    p.add_argument("--passes", "-N", type=int, default=None,
                   help="N: passes per window (1 = no sleep; default: config.json 'sleep', else 1)")
    refuse_renamed(p, "--sleep-passes", "--passes", "one N: the passes per window")
    p.add_argument("--window", "-L", type=int, default=None,
                   help="L: window size in tokens (default: config.json 'sleep.window')")
    p.add_argument("--eviction", choices=["hard", "sliding"], default=None, help="default: config.json, else hard")
    p.add_argument("--adaptive-tol", type=float, default=None,
                   help="stop sleeping a window once every state's relative change is below this")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos-id", type=int, default=None, help="stop token (default: the tokenizer's eos)")
    p.add_argument("--no-eos", action="store_true", help="never stop before --max-new-tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--kernels", choices=["auto", "torch", "cuda"], default=None,
                   help="kernel backend (default: the checkpoint's)")
    p.add_argument("--bos", action="store_true", help="prepend the tokenizer's bos id to the prompt")


def _parse_ids(text: str) -> list[int]:
    parts = text.replace(",", " ").split()
    try:
        return [int(x) for x in parts]
    except ValueError as exc:
        raise ValueError(f"--prompt-ids must be integers separated by commas or spaces ({exc})") from None


def _peak_rss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def main(args: argparse.Namespace) -> int:
    import torch

    from megasleep.inference.checkpoint import (
        check_vocab,
        default_tokenizer_path,
        load_model,
        read_checkpoint_config,
        trained_forward_switches,
    )
    from megasleep.inference.generate import generate_stream
    from megasleep.sleep import SleepConfig

    ckpt = Path(args.checkpoint)
    raw = read_checkpoint_config(ckpt)
    saved = raw.get("sleep") if isinstance(raw.get("sleep"), dict) else {}
    passes = args.passes if args.passes is not None else saved.get("passes", 1)
    window = args.window if args.window is not None else saved.get("window")
    eviction = args.eviction or saved.get("eviction", "hard")
    if passes < 1:
        raise ValueError(f"--passes must be >= 1 (1 = no sleep), got {passes}")
    if window is None:
        raise ValueError(f"give --window L (no 'sleep.window' in {ckpt / 'config.json'})")
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype_name = DTYPES.get(args.dtype) or ("bfloat16" if str(device).startswith("cuda") else "float32")
    model = load_model(ckpt, device=device, dtype=getattr(torch, dtype_name))
    print(f"[megasleep generate] {ckpt}: read with the {model.pretrained_meta['format']} adapter", file=sys.stderr)

    tok_path = args.tokenizer or default_tokenizer_path(ckpt)
    tokenizer = None
    if tok_path is not None:
        from megasleep.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_path)
        check_vocab(model, tokenizer, f" {ckpt}")
    if args.prompt_ids is not None:
        ids = _parse_ids(args.prompt_ids)
    else:
        text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
        if tokenizer is None:
            raise ValueError(f"a text prompt needs a tokenizer: no {ckpt / 'tokenizer.model'}; "
                             "give --tokenizer PATH or --prompt-ids")
        ids = tokenizer.encode(text, add_bos=args.bos)
    if not ids:
        raise ValueError("empty prompt: give at least one token")
    eos = None if args.no_eos else (args.eos_id if args.eos_id is not None else
                                     (tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id >= 0 else None))
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    sleep = SleepConfig(window=window, passes=passes, eviction=eviction, adaptive_tol=args.adaptive_tol,
                        checkpoint=False, **trained_forward_switches(saved))
    stream = generate_stream(model, [ids], args.max_new_tokens, sleep=sleep, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, eos_id=eos, seed=args.seed, device=device, backend=args.kernels)
    out = sys.stdout
    t0 = time.perf_counter()
    gen: list[int] = []
    shown = ""
    for ev in stream:
        gen.append(ev.token)
        if tokenizer is None:
            out.write(("" if len(gen) == 1 else " ") + str(ev.token))
        else:
            text = tokenizer.decode(gen)   # decode the whole continuation: pieces join with spaces right
            if text.startswith(shown):
                out.write(text[len(shown):])
            shown = text
        out.flush()
    out.write("\n")
    out.flush()
    wall = time.perf_counter() - t0
    st = stream.stats
    pu = st.passes_used
    if pu:
        counts = {n: pu.count(n) for n in sorted(set(pu))}
        passes_txt = ", ".join(f"{n} passes x{c}" for n, c in counts.items()) + f" (mean {sum(pu) / len(pu):.2f})"
    else:
        passes_txt = "no sleep (N = 1)" if passes == 1 else "no window filled yet"
    mem = f"peak RSS {_fmt_bytes(_peak_rss_bytes())}, session state {_fmt_bytes(st.state_bytes)}"
    if str(device).startswith("cuda"):
        mem += f", CUDA max allocated {_fmt_bytes(torch.cuda.max_memory_allocated())}"
    print(f"[megasleep generate] N={passes} L={window} eviction={eviction} device={device} dtype={dtype_name}\n"
          f"  prompt {st.prompt_tokens} tokens, prefill {st.prefill_seconds:.3f} s; generated {st.generated_tokens}"
          f" tokens in {wall:.3f} s\n"
          f"  sleeps: {st.sleeps}; passes used per window: {passes_txt}; sleep time {st.sleep_seconds:.3f} s\n"
          f"  awake: {st.awake_tokens_per_s:.1f} tokens/s (decode steps, sleep excluded)\n"
          f"  memory: {mem}", file=sys.stderr)
    return 0
