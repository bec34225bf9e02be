"""`megasleep eval`: evaluate a checkpoint at several sleep depths; `megasleep eval compare RESULTS...`;
`megasleep eval lm-eval ARGS...` (lm-evaluation-harness with the `megasleep` model registered).

    megasleep eval --checkpoint DIR (--data SHARDS | --task rule110|depo|gsm [--difficulty 1-16])
                   --eval-passes 1,2,4,8 [--window L] [--eviction hard|sliding] [--max-examples K]
                   [--adaptive-tol X] [--out RESULTS_DIR]

With ``--task`` and a checkpoint that records the task it was trained on (``config.json`` ->
``source.data.task``, written by the trainer's export and ``megasleep export``), the generator
parameters and difficulty default to the recorded ones (said in one line); parameters given that
differ from them are evaluated as given, with a one-line warning. Every N also gets the collapse
diagnostics (:mod:`megasleep.sleep.diagnostics`), stored in its result and printed as a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path

from megasleep.renamed_options import refuse_renamed


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"sleep passes must be integers >= 1, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_mode", metavar="MODE")
    c = sub.add_parser("compare", help="side-by-side table of several results directories",
                       description="Print a side-by-side table of several `megasleep eval` results.")
    c.add_argument("results", nargs="+", help="results directories (or their results.json)")
    c.add_argument("--csv", default=None, help="also write the table as CSV here")
    lm = sub.add_parser("lm-eval", help="run lm-evaluation-harness with --model megasleep available",
                        description="Arguments after `lm-eval` go to lm-evaluation-harness unchanged.")
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER)

    p.add_argument("--checkpoint", help="exported model dir (megasleep export) or a mamba_ssm checkpoint dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="task or text shards: dir with manifest.json, glob, brace pattern or URL")
    src.add_argument("--task", help="generate samples on the fly: rule110 | depo | gsm")
    p.add_argument("--difficulty", default=None,
                   help="--task: difficulties, e.g. 32 or 1-16 or 1,2,4,8,16 (default: the task's test range)")
    p.add_argument("--n-examples", type=int, default=64, help="--task: samples per difficulty (default 64)")
    p.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                   help="--task: generator parameter (repeatable), e.g. length_min=500")
    p.add_argument("--seed", type=int, default=0, help="generator seed (--task) and bootstrap seed")
    p.add_argument("--split", default="test", help="--task: generator split name (default test)")
    p.add_argument("--eval-passes", type=_int_list, default=None, metavar="N1,N2,...",
                   help="sleep depths N to evaluate at (default: 1 and the checkpoint's training N)")
    refuse_renamed(p, "--sleep-passes", "--eval-passes", "the list of N to evaluate at")
    p.add_argument("--window", type=int, default=None,
                   help="window L (default: the checkpoint's training window, else the task's)")
    p.add_argument("--eviction", choices=["hard", "sliding"], default=None,
                   help="eviction mode (default: the checkpoint's, else hard)")
    p.add_argument("--adaptive-tol", type=float, default=None,
                   help="adaptive sleep: stop a window's passes once the relative state change < tol")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first K samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--scoring", choices=["auto", "teacher", "generate"], default="auto",
                   help="auto: GSM by greedy generation + GSM-Infinite extraction, other tasks by teacher-forced "
                        "exact match (equal to greedy decoding of the answer)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="GSM generation budget (default: the answer's token count)")
    p.add_argument("--out", default=None, help="results directory (default results/eval/<checkpoint>_<data>_<time>)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 | auto")
    p.add_argument("--tokenizer", default=None, help="tokenizer .model (default: the checkpoint's)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="evaluate even if the data's tokenizer hash differs from the checkpoint's")
    p.add_argument("--chance", type=float, default=None,
                   help="accuracy of guessing, drawn in the plots (default: the task's, where it fixes one)")
    p.add_argument("--diagnostics-samples", type=int, default=64, metavar="K",
                   help="collapse diagnostics per N on K samples spread over the data (default 64; 0: off)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


# default difficulty ranges when generating (docs/tasks.md)
TASK_DIFFICULTIES = {"rule110": "32", "depo": "1,2,4,8,16", "gsm": "1-8"}


def _parse_params(items: list[str]) -> dict:
    from megasleep.config import parse_override

    out = {}
    for it in items:
        path, value = parse_override(it)
        out[".".join(path)] = value
    return out


def recorded_task(info: dict) -> dict | None:
    """The task a checkpoint was trained on (``source.data.task`` of an export), or None."""
    data = (info.get("source") or {}).get("data") or {}
    task = data.get("task") if isinstance(data, dict) and data.get("source") == "task" else None
    return task if isinstance(task, dict) and task.get("name") else None


def task_settings(args, info: dict) -> tuple[dict, object, list[str]]:
    """(generator parameters, difficulty, notes) for ``--task``: what the user gave, else what the
    checkpoint records for that task, else the task's defaults; a note when they default or differ."""
    from megasleep.data.tasks import TASKS

    given = _parse_params(args.task_param)
    rec = recorded_task(info)
    if rec is None:
        return given, args.difficulty or TASK_DIFFICULTIES.get(args.task, "1"), []
    where = f"{args.checkpoint} (config.json source.data.task)"
    if rec["name"] != args.task:
        return given, args.difficulty or TASK_DIFFICULTIES.get(args.task, "1"), [
            f"warning: {where} was trained on task {rec['name']!r}, not {args.task!r}: using {args.task}'s defaults"]
    spec, rec_params = TASKS[args.task], dict(rec.get("params") or {})
    rec_diff = rec.get("eval_difficulty") or rec.get("difficulty")
    notes = []
    if not given:
        params = rec_params
        if rec_params:
            notes.append(f"using the task parameters recorded in {where}: {rec_params} (--task-param overrides)")
    else:
        params = given
        theirs, ours = spec.params(**rec_params), spec.params(**given)
        diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs.get(k)}
        if diff:
            notes.append(f"warning: task parameters differ from those {where} was trained with: "
                         + ", ".join(f"{k}={a!r} (trained {b!r})" for k, (a, b) in diff.items()))
    if args.difficulty is None and rec_diff is not None:
        notes.append(f"using the difficulty recorded in {where}: {rec_diff} (--difficulty overrides)")
        return params, rec_diff, notes
    return params, args.difficulty or TASK_DIFFICULTIES.get(args.task, "1"), notes


def run(args) -> Path:
    import torch

    from megasleep.checkpoint.load import checkpoint_info, load_pretrained
    from megasleep.checkpoint.released import tokenizer_path
    from megasleep.eval import data as D
    from megasleep.eval.harness import EvalSettings, evaluate
    from megasleep.eval.report import write_results
    from megasleep.eval.scoring import chance_level
    from megasleep.inference.checkpoint import trained_forward_switches

    if not args.checkpoint:
        raise ValueError("--checkpoint is required (an exported model directory)")
    if not (args.data or args.task):
        raise ValueError("give --data SHARDS or --task NAME")
    if args.task:
        from megasleep.data.tasks import TASKS

        if args.task not in TASKS:
            raise D.UnknownTaskError(f"unknown task {args.task!r}; known tasks: {sorted(TASKS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = checkpoint_info(args.checkpoint)
    if args.task:
        task_params, task_difficulty, notes = task_settings(args, info)
        for line in notes:
            print(f"[megasleep eval] {line}", file=sys.stderr, flush=True)
    model = load_pretrained(args.checkpoint, device=device, dtype=args.dtype)
    print(f"[megasleep eval] {args.checkpoint}: read with the {info['format']} adapter", file=sys.stderr)
    tok_file = Path(args.tokenizer) if args.tokenizer else tokenizer_path(args.checkpoint)
    ck_sleep = info.get("sleep") or {}
    ck_tok_hash = (info.get("tokenizer") or {}).get("hash")

    with tempfile.TemporaryDirectory(prefix="megasleep-eval-") as tmp:
        tokenizer = None
        if tok_file is not None:
            from megasleep.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tok_file)
        if args.task:
            if tokenizer is None:
                tokenizer = D.resolve_tokenizer(None, args.task, Path(tmp))
            data = D.generate_task_data(args.task, tokenizer, args.n_examples, task_difficulty, args.seed,
                                        args.split, task_params)
            if args.max_examples is not None:
                data.samples = data.samples[:args.max_examples]
                data.info["n_examples"] = len(data.samples)
        else:
            from megasleep.data.manifest import manifest_tokenizer_hash, resolve_shards

            _, manifest = resolve_shards(args.data)  # fails early on missing shards / manifest
            data_hash = manifest_tokenizer_hash(manifest) if manifest else None
            if data_hash and ck_tok_hash and data_hash != ck_tok_hash and not args.allow_tokenizer_mismatch:
                from megasleep.data.errors import TokenizerMismatchError

                raise TokenizerMismatchError(
                    f"tokenizer mismatch: the data ({(manifest or {}).get('_path')}) was tokenized with {data_hash} "
                    f"but checkpoint {args.checkpoint} uses {ck_tok_hash} (pass --allow-tokenizer-mismatch to "
                    f"evaluate anyway)")
            data = D.load_shard_data(args.data, args.max_examples, vocab_size=model.config.vocab_size)
        used_hash = getattr(tokenizer, "hash", None)
        if tokenizer is None and data.kind == "task" and args.data:
            tok_meta = ((data.info.get("manifest") or {}).get("tokenizer") or {})
            if tok_meta.get("path") and Path(tok_meta["path"]).is_file():
                from megasleep.data.tokenizer import load_tokenizer

                t = load_tokenizer(tok_meta["path"])
                if t.hash == data.tokenizer_hash:
                    tokenizer, used_hash = t, t.hash
        window = args.window or ck_sleep.get("window") or D.TASK_WINDOWS.get(data.task or "")
        if not window:
            raise ValueError("--window is required (the checkpoint records no training window and the data is "
                             "not a known task)")
        passes = args.eval_passes or sorted({1, int(ck_sleep.get("passes") or 1)})
        settings = EvalSettings(eval_passes=passes, window=int(window), eviction=args.eviction or ck_sleep.get("eviction")
                                or "hard", adaptive_tol=args.adaptive_tol, batch_size=args.batch_size,
                                bootstrap=args.bootstrap, seed=args.seed, scoring=args.scoring,
                                max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                                diagnostics_samples=max(0, args.diagnostics_samples),
                                **trained_forward_switches(ck_sleep))
        results, records = evaluate(model, data, settings, tokenizer)

    import megasleep

    name = Path(args.checkpoint).resolve().name
    dname = data.task or Path(str(args.data)).name or "data"
    out = Path(args.out) if args.out else Path("results") / "eval" / \
        f"{name}_{dname}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    doc = {
        "format": "megasleep-eval", "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "megasleep_version": megasleep.__version__,
        "command": " ".join(sys.argv),
        "checkpoint": {**info, "parameters": model.num_parameters()},
        "data": {"kind": data.kind, "task": data.task, "difficulty_name": data.difficulty_name, **data.info},
        "tokenizer": {"checkpoint": ck_tok_hash, "data": data.tokenizer_hash, "used": used_hash},
        "settings": {"eval_passes": passes, "window": settings.window, "eviction": settings.eviction,
                     **trained_forward_switches(ck_sleep),
                     "adaptive_tol": settings.adaptive_tol, "batch_size": settings.batch_size,
                     "bootstrap": settings.bootstrap, "seed": settings.seed, "scoring": settings.scoring,
                     "max_new_tokens": settings.max_new_tokens, "max_examples": args.max_examples,
                     "chance": args.chance if args.chance is not None else chance_level(data.task, data.samples),
                     "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "kernels": model.config.kernels},
        "results": results,
    }
    write_results(out, doc, records, plots=not args.no_plots)
    return out


def _summary(out: Path) -> str:
    from megasleep.eval.report import compare

    return compare([str(out)])


def diagnostics_summary(out: Path) -> str:
    """The collapse diagnostics of every N evaluated, as a table with each N's status ("" if none)."""
    import json

    from megasleep.sleep.diagnostics import diagnostics_table

    results = json.loads((out / "results.json").read_text())["results"]
    rows = {f"N={r['passes']}": (r["diagnostics"], r["collapse_status"]) for r in results if r.get("diagnostics")}
    if not rows:
        return ""
    return ("collapse diagnostics (consolidation windows; status against the model's own wake pass):\n"
            + diagnostics_table(rows))


def main(args) -> int:
    mode = getattr(args, "eval_mode", None)
    if mode == "compare":
        from megasleep.eval.report import compare

        print(compare(args.results, args.csv))
        return 0
    if mode == "lm-eval":
        from megasleep.eval.lm_eval_cli import main as lm_main

        rest = list(args.lm_eval_args)
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return lm_main(rest)
    out = run(args)
    print(_summary(out))
    diag = diagnostics_summary(out)
    if diag:
        print("\n" + diag)
    print(f"\nresults written to {out}")
    return 0
