"""Write datasets as WebDataset shards plus ``manifest.json`` (the CLIs in ``data_pipelines/`` wrap
these functions).

* :func:`build_task_split` / :func:`build_task_dataset`: seeded task samples, one shard per job,
  written in parallel by a process pool with ``webdataset.TarWriter`` (sample ``i`` depends only on
  (seed, split, i), so the bytes do not depend on the number of workers).
* :func:`build_text_dataset`: documents from jsonl / txt / parquet, tokenized in parallel (ordered),
  packed (``mode="pack"``) or cut (``mode="cut"``) into sequences of ``seq_len`` tokens with the
  document starts recorded, written with ``webdataset.ShardWriter``.
* :func:`import_gsm_official`: the official GSM-Infinite files into our GSM layout.

Tar members get ``mtime=0`` and fixed owner / mode, and json is written with sorted keys, so the same
inputs give byte-identical shards (the manifest records every shard's sha256); how a shard is
written: :mod:`megasleep.data.shard_writer`. Formats: docs/data.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from megasleep.atomic import atomic_path
from megasleep.data.block import BlockWriter
from megasleep.data.errors import DataError
from megasleep.data.manifest import MANIFEST, shard_record, write_manifest
from megasleep.data.sample import make_sample
from megasleep.data.shard_writer import (
    GZ_PATTERN,
    SHARD_PATTERN,
    TAR_KW,
    CountingShardWriter,
    GzipFile,
    chunks,
    clean_shards,
    ordered_map,
    progress_bar,
    sample_digest,
    tokenizer_and_totals,
)
from megasleep.data.tokenizer import Tokenizer, load_tokenizer

# ------------------------------------------------------------------------------------------------
# task shards

_WORKER_TOK: Tokenizer | None = None


def _init_worker(tok_path: str):
    global _WORKER_TOK
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_TOK = load_tokenizer(tok_path)


def _write_task_shard(job: dict) -> dict:
    """One shard: samples [start, end) of a split. Runs in a pool worker (or inline)."""
    import webdataset as wds

    from megasleep.data.tasks import get_task

    tok = _WORKER_TOK if _WORKER_TOK is not None else load_tokenizer(job["tokenizer"])
    task = get_task(job["task"])
    path = Path(job["path"])
    tokens = targets = no_target = 0
    digests = []
    diff_counts: dict[int, int] = {}
    with atomic_path(path) as tmp:  # a crash never leaves a torn shard under its final name
        gz = GzipFile(str(tmp)) if job.get("compress") else None
        with wds.TarWriter(gz if gz is not None else str(tmp), **TAR_KW) as w:
            blocks = BlockWriter(w.write)
            for i in range(job["start"], job["end"]):
                s = task.sample(job["seed"], job["split"], i, job["difficulties"], tok, **job["params"])
                blocks.add(s, f"{job['split']}-{i:09d}")
                tokens += int(s["input_ids"].size)
                n_targets = int(s["loss_mask"].sum())
                targets += n_targets
                no_target += n_targets == 0
                d = int(s["meta"]["difficulty"])
                diff_counts[d] = diff_counts.get(d, 0) + 1
                if job["digests"]:
                    digests.append(sample_digest(s["input_ids"]))
            blocks.flush()
        if gz is not None:
            gz.close()
    rec = shard_record(path, job["end"] - job["start"], tokens, targets=targets, no_target=no_target)
    return {"record": rec, "digests": digests, "difficulties": diff_counts}


def build_task_split(
    task: str,
    out_dir: str | os.PathLike,
    split: str,
    num_samples: int,
    seed: int,
    difficulties,
    tokenizer: str | os.PathLike,
    params: dict | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
    keep_digests: bool = False,
    compress: bool = False,
) -> dict:
    """Generate ``num_samples`` samples of ``task`` into ``out_dir`` (shards + manifest.json).

    ``difficulties``: spec for :func:`megasleep.data.tasks.parse_difficulty` (``"1-16"``, ``"1,2,4"``).
    ``compress``: write ``.tar.gz`` shards (deterministic gzip; ~10x smaller for short samples, whose
    tar headers dominate). Returns the manifest (with ``_digests``, a list of 8-byte content hashes,
    if ``keep_digests``).
    """
    from megasleep.data.tasks import get_task, parse_difficulty

    spec = get_task(task)
    params = spec.params(**(params or {}))
    tok = load_tokenizer(tokenizer)
    diffs = parse_difficulty(difficulties)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_shards(out)
    n_shards = max(1, -(-num_samples // shard_size))
    pattern = GZ_PATTERN if compress else SHARD_PATTERN
    jobs = [
        dict(task=task, tokenizer=tok.path, split=split, seed=int(seed), difficulties=diffs, params=params,
             start=k * shard_size, end=min(num_samples, (k + 1) * shard_size), path=str(out / (pattern % k)),
             digests=keep_digests, compress=compress)
        for k in range(n_shards)
        if k * shard_size < num_samples
    ]
    results: list[dict | None] = [None] * len(jobs)
    import webdataset  # noqa: F401  (import once here: forked pool workers inherit it instead of re-importing torch)

    bar = progress_bar(num_samples, f"{task}/{split}", progress)
    if workers <= 1 or len(jobs) == 1:
        _init_worker(tok.path)
        for k, job in enumerate(jobs):
            results[k] = _write_task_shard(job)
            bar.update(job["end"] - job["start"])
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(tok.path,)) as pool:
            futs = {pool.submit(_write_task_shard, job): k for k, job in enumerate(jobs)}
            from concurrent.futures import as_completed

            for f in as_completed(futs):
                k = futs[f]
                results[k] = f.result()
                bar.update(jobs[k]["end"] - jobs[k]["start"])
    bar.close()
    shards = [r["record"] for r in results]
    diff_hist: dict[str, int] = {}
    for r in results:
        for d, c in r["difficulties"].items():
            diff_hist[str(d)] = diff_hist.get(str(d), 0) + c
    manifest = {
        "kind": "task",
        "task": task,
        "generator": spec.generator,
        "generator_version": spec.version,
        "params": params,
        "compress": compress,
        "difficulty": {"name": spec.difficulty_name, "values": diffs, "histogram": diff_hist},
        "seed": int(seed),
        "split": split,
        **tokenizer_and_totals(tok, shards),
        "shards": shards,
    }
    write_manifest(out, manifest)
    if keep_digests:
        manifest["_digests"] = [d for r in results for d in r["digests"]]
    return manifest


def build_task_dataset(
    task: str,
    out_dir: str | os.PathLike,
    counts: dict[str, int],
    seed: int,
    difficulties: dict[str, object] | object,
    tokenizer: str | os.PathLike,
    params: dict | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = True,
    check_disjoint: bool = True,
    compress: bool = False,
) -> dict[str, dict]:
    """Several splits (``counts={"train": N, "val": n, "test": n}``) under ``out_dir/<split>/``.

    Splits use disjoint seed streams; with ``check_disjoint`` the content hashes of all samples are
    compared and a :class:`DataError` is raised if two splits share a sample. Writes an index
    ``out_dir/manifest.json`` naming the splits.
    """
    manifests = {}
    seen: dict[bytes, str] = {}
    overlaps: dict[str, int] = {}
    for split, n in counts.items():
        if n <= 0:
            continue
        diffs = difficulties.get(split, difficulties.get("train")) if isinstance(difficulties, dict) else difficulties
        m = build_task_split(task, Path(out_dir) / split, split, n, seed, diffs, tokenizer, params, shard_size,
                             workers, progress, keep_digests=check_disjoint, compress=compress)
        for d in m.pop("_digests", []):
            other = seen.get(d)
            if other is not None and other != split:
                key = f"{other}/{split}"
                overlaps[key] = overlaps.get(key, 0) + 1
            else:
                seen.setdefault(d, split)
        manifests[split] = m
    if overlaps:
        raise DataError(f"{out_dir}: splits share samples {overlaps}; use a larger problem space or another seed")
    write_manifest(out_dir, {
        "kind": "task-index",
        "task": task,
        "seed": int(seed),
        "splits": {s: f"{s}/{MANIFEST}" for s in manifests},
        "disjoint_checked": bool(check_disjoint),
        "tokenizer": next(iter(manifests.values()))["tokenizer"] if manifests else None,
    })
    return manifests


# ------------------------------------------------------------------------------------------------
# text shards


def _tokenize_chunk(args) -> list[list[int]]:
    texts, bos, eos = args
    tok = _WORKER_TOK
    return tok.encode_batch(texts, add_bos=bos, add_eos=eos)


def _text_sample(ids: list[int], starts: list[int], docs: list, bos_id: int) -> dict:
    arr = np.asarray(ids, dtype=np.int32)
    mask = np.ones(arr.size, dtype=np.uint8)
    mask[0] = 0
    for p in starts:  # a document's first token is not predicted from the previous document
        mask[p] = 0
    mask[arr == bos_id] = 0
    meta = {"task": "text", "difficulty": 0, "answer": "", "answer_positions": [], "docs": docs}
    return make_sample(arr, mask, meta, doc_starts=starts)


def build_text_dataset(
    inputs,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    seq_len: int,
    mode: str = "pack",
    text_field: str = "text",
    txt_mode: str = "file",
    shard_size: int = 1000,
    workers: int = 1,
    min_tokens: int = 2,
    max_docs: int | None = None,
    progress: bool = True,
    name: str = "text",
    compress: bool = False,
    select: Callable[[int], bool] | None = None,
    stats: dict | None = None,
) -> dict:
    """Tokenize a corpus into shards of sequences of ``seq_len`` tokens (+ manifest.json).

    Every document becomes ``<s> tokens </s>``. ``mode="pack"``: documents are concatenated and cut
    into sequences of exactly ``seq_len`` tokens (a document may continue in the next sequence;
    ``doc_starts`` records where each document starts, position 0 always counts as a start).
    ``mode="cut"``: each document is cut into pieces of at most ``seq_len`` tokens, one document per
    sample. Pieces shorter than ``min_tokens`` are dropped. Loss on every token except position 0 and
    each document's first token. ``inputs``: files, globs, directories or a
    :class:`~megasleep.data.corpus.CorpusScan`. ``select(k)`` (optional) keeps the ``k``-th document
    of the corpus (0-based), e.g. to split train / validation. ``stats`` receives what was read
    (:func:`megasleep.data.corpus.corpus_report` prints it).
    """
    from megasleep.data.corpus import iter_documents, scan_corpus

    if mode not in ("pack", "cut"):
        raise ValueError(f"mode must be 'pack' or 'cut', got {mode!r}")
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    tok = load_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scan = scan_corpus(inputs)
    clean_shards(out)
    stats = stats if stats is not None else {}
    docs_iter = iter_documents(scan, text_field=text_field, txt_mode=txt_mode, stats=stats)
    if select is not None:
        docs_iter = (d for k, d in enumerate(docs_iter) if select(k))
    if max_docs is not None:
        from itertools import islice

        docs_iter = islice(docs_iter, max_docs)

    kept = {"documents": 0, "bytes": 0}  # what reaches the shards (``stats`` counts all that was read)

    def doc_chunks():
        for chunk in chunks(docs_iter, 256):
            kept["documents"] += len(chunk)
            kept["bytes"] += sum(len(d.text.encode("utf-8")) for d in chunk)
            yield [d.text for d in chunk], [[Path(d.source).name, d.index] for d in chunk]

    writer = CountingShardWriter(out, shard_size, compress)
    n_seq = 0
    bar = progress_bar(0, f"{name} sequences", progress)
    buf: list[int] = []
    buf_starts: list[int] = []
    buf_docs: list = []

    def emit(ids, starts, docs):
        nonlocal n_seq
        if len(ids) < min_tokens:
            return
        if not starts or starts[0] != 0:  # the sequence opens with the continuation of a document
            starts = [0, *starts]
        writer.write(_text_sample(ids, starts, docs, tok.bos_id), f"{name}-{n_seq:09d}")
        n_seq += 1
        bar.update(1)

    def consume(token_lists: list[list[int]], doc_refs: list):
        nonlocal buf, buf_starts, buf_docs
        for ids, ref in zip(token_lists, doc_refs):
            if mode == "cut":
                for k in range(0, len(ids), seq_len):
                    emit(ids[k : k + seq_len], [0], [ref])
                continue
            pos = 0
            while pos < len(ids):
                if pos == 0:
                    buf_starts.append(len(buf))
                buf_docs.append(ref)
                take = min(seq_len - len(buf), len(ids) - pos)
                buf.extend(ids[pos : pos + take])
                pos += take
                if len(buf) == seq_len:
                    emit(buf, buf_starts, buf_docs)
                    buf, buf_starts, buf_docs = [], [], []

    try:
        if workers <= 1:
            _init_worker(tok.path)
            for texts, refs in doc_chunks():
                consume(_tokenize_chunk((texts, True, True)), refs)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(tok.path,)) as pool:
                jobs = (((texts, True, True), refs) for texts, refs in doc_chunks())
                for token_lists, refs in ordered_map(pool, _tokenize_chunk, jobs, window=4 * workers):
                    consume(token_lists, refs)
        if buf:
            emit(buf, buf_starts, buf_docs)
    finally:
        records = writer.close()
        bar.close()
    if not records:
        raise DataError(f"{', '.join(scan.paths[:3])}{' ...' if len(scan.paths) > 3 else ''}: no sequence produced "
                        f"({kept['documents']} documents kept)")
    if stats.get("skipped"):
        warnings.warn(f"{stats['skipped']} records without a string {text_field!r} field were skipped", stacklevel=2)
    manifest = {
        "kind": "text",
        "task": "text",
        "generator": __name__ + ".build_text_dataset",
        "generator_version": "1",
        "params": {"seq_len": seq_len, "mode": mode, "text_field": text_field, "txt_mode": txt_mode,
                   "min_tokens": min_tokens, "max_docs": max_docs, "compress": compress},
        "seed": None,
        "split": name,
        "sources": [{"path": f, "bytes": Path(f).stat().st_size} for f in scan.paths],
        "documents": kept["documents"],
        "document_bytes": kept["bytes"],
        "skipped_documents": stats.get("skipped", 0),
        **tokenizer_and_totals(tok, records),
        "shards": records,
    }
    write_manifest(out, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------
# official GSM-Infinite files


def import_gsm_official(
    files,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike,
    shard_size: int = 1000,
    max_len: int | None = None,
    split: str = "official",
    progress: bool = True,
    max_skip_fraction: float = 0.05,
    compress: bool = False,
) -> dict:
    """Convert official GSM-Infinite parquet / jsonl files (see :mod:`...tasks.gsm_official`)."""
    from megasleep.data.corpus import expand_paths
    from megasleep.data.tasks import gsm_official

    tok = load_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_shards(out)
    paths = expand_paths(files)
    stats: dict = {}
    writer = CountingShardWriter(out, shard_size, compress)
    bar = progress_bar(0, "gsm-infinite rows", progress)
    hist: dict[str, int] = {}
    n = 0
    try:
        for s in gsm_official.iter_official(paths, tok, max_len=max_len, stats=stats):
            writer.write(s, f"{split}-{n:09d}")
            d = str(s["meta"]["difficulty"])
            hist[d] = hist.get(d, 0) + 1
            n += 1
            bar.update(1)
    finally:
        records = writer.close()
        bar.close()
    rows, skipped = stats.get("rows", 0), stats.get("skipped", 0)
    if rows and skipped / rows > max_skip_fraction:
        raise DataError(f"{skipped} of {rows} rows of {paths} could not be imported (> {max_skip_fraction:.0%})")
    if not records:
        raise DataError(f"no sample imported from {paths}")
    manifest = {
        "kind": "task",
        "task": "gsm",
        "generator": gsm_official.__name__,
        "generator_version": gsm_official.VERSION,
        "params": {"max_len": max_len, "compress": compress},
        "difficulty": {"name": "ops", "histogram": hist},
        "seed": None,
        "split": split,
        "sources": [{"path": p, "bytes": Path(p).stat().st_size} for p in paths],
        "rows": rows,
        "skipped_rows": skipped,
        **tokenizer_and_totals(tok, records),
        "shards": records,
    }
    write_manifest(out, manifest)
    return manifest
