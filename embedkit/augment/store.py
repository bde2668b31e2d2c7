"""The durable pair store: generate a positive-pair set once, reuse it, resume it (the engine behind
``make_pairs`` and ``embedkit-pairs``).

Cache layout (``cache_dir`` is ``paths.pair_cache``, ``outputs/cache/pairs`` by default, for the command line
and for training runs alike)::

    <cache_dir>/<method>-<key>/request.json    what was asked: method, generator, settings, seed, #texts
    <cache_dir>/<method>-<key>/parts-<n>/*.json one file per finished chunk of n texts (only while generating)
    <cache_dir>/<method>-<key>/pairs.jsonl     the finished pair set, one row per kept source
    <cache_dir>/<method>-<key>/meta.json       request + filter report + timing (written last)

``key`` is a SHA-256 over (source texts in order, method, generator model, settings, seed): the same
request finds the finished set and does no generation. Every file is written to a temporary file,
fsync'ed and renamed into place, so a crash leaves whole chunks only; a re-run skips the chunks already
on disk and continues with the next one (an interrupted run loses at most one chunk of work).

Rows: ``{"anchor", "positive", "source_id", "method", "generator", "settings", "seed", "attempts", ...}``
(plus ``instruction`` for paraphrases, ``pivot`` for back-translation).

The store knows nothing of the methods: it takes any augmenter with ``method``, ``name``, ``generator``,
``settings()``, ``chunk_size``, ``max_source_chars``, ``stats``, ``last_report`` and ``generate_chunk``
(:class:`embedkit.augment.base.Augmenter`). The command line that fills it from a file is
``embedkit-pairs`` (:mod:`embedkit.commands.pairs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from embedkit.augment.filters import FilterReport
from embedkit.errors import EmbedkitError
from embedkit.io import atomic_write

__all__ = ["FORMAT_VERSION", "PairResult", "cache_key", "generate_pairs", "pair_set_dir",
           "row_settings", "write_durable", "write_rows"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class PairResult:
    """A finished pair set: its rows, the filter report (a dict), where it lives, whether it was cached."""

    rows: list[dict]
    report: dict
    path: Path
    from_cache: bool
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ writing
def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts) to ``path`` as JSONL, one row a line, atomically and durably (:func:`write_durable`)."""
    write_durable(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def cache_key(texts: Sequence[str], method: str, generator: str, settings: dict, seed: int) -> str:
    """Hex SHA-256 of everything that determines the pair set: the texts in order, method, generator,
    settings, seed. Source ids are provenance only and not part of the key, so a set made with
    ``embedkit-pairs`` from a file is reused by a training run on the same texts (rows then keep the
    ids of the run that generated them)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "method": method, "generator": generator,
                         "settings": settings, "seed": seed}, sort_keys=True, default=str).encode())
    for t in texts:
        h.update(b"\x00" + t.encode())
    return h.hexdigest()


def pair_set_dir(augmenter, texts: Sequence[str], cache_dir: str | Path, seed: int) -> Path:
    """The folder under ``cache_dir`` that holds the pair set of (texts, augmenter, seed):
    ``<method>-<first 20 hex digits of cache_key>``."""
    key = cache_key(texts, augmenter.method, augmenter.generator, augmenter.settings(), seed)
    return Path(cache_dir).expanduser() / f"{augmenter.method}-{key[:20]}"


def row_settings(settings: dict) -> dict:
    """The settings stored in every row: scalars only (sampling, lengths, probabilities) plus a hash of the
    full settings (instructions, filters, prompts), which ``meta.json`` holds in full."""
    small = {k: v for k, v in settings.items()
             if isinstance(v, (int, float, bool)) or v is None or (isinstance(v, str) and len(v) <= 80)}
    small["settings_sha"] = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return small


def _read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL pair file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------- generating
def _check_texts(texts: Sequence[str], ids: Sequence[str] | None, max_chars: int) -> tuple[list[str], list[str], dict]:
    """Drop blank and over-long texts (reported, not silently), validate types and ids."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise EmbedkitError(f"make_pairs expects a list of texts, got {type(texts).__name__}")
    if ids is None:
        ids = [str(i) for i in range(len(texts))]
    ids = [str(i) for i in ids]
    if len(ids) != len(texts):
        raise EmbedkitError(f"make_pairs: {len(texts)} texts but {len(ids)} ids")
    keep_t, keep_i, blank, huge = [], [], [], []
    for i, (t, sid) in enumerate(zip(texts, ids)):
        if not isinstance(t, str):
            raise EmbedkitError(f"make_pairs: text {i} (id {sid}) is {type(t).__name__}, not a string")
        if not t.strip():
            blank.append(sid)
        elif len(t) > max_chars:
            huge.append(sid)
        else:
            keep_t.append(t)
            keep_i.append(sid)
    skipped = {}
    if blank:
        skipped["blank"] = len(blank)
    if huge:
        skipped[f"longer_than_{max_chars}_chars"] = len(huge)
    if skipped:
        log.warning("pair generation skips %s of %d texts (%s); ids: %s", len(blank) + len(huge), len(texts),
                    ", ".join(f"{k} {v}" for k, v in skipped.items()), ", ".join((blank + huge)[:5]))
    if not keep_t:
        raise EmbedkitError(
            f"no text to make pairs from: {len(texts)} given, {len(blank)} blank, {len(huge)} longer than "
            f"{max_chars} characters (augmentation.max_source_chars)")
    return keep_t, keep_i, skipped


def generate_pairs(augmenter, texts: Sequence[str], cache_dir: str | Path, seed: int = 0,
                   ids: Sequence[str] | None = None, show_progress: bool = True) -> PairResult:
    """The pair set for (texts, augmenter settings, seed): read from the cache, resumed, or generated.

    Raises :class:`EmbedkitError` when no source survived the filters (the counts per reason are in the
    message; the generated set stays cached so the counts are not paid for twice).
    """
    texts, ids, skipped = _check_texts(texts, ids, augmenter.max_source_chars)
    folder = pair_set_dir(augmenter, texts, cache_dir, seed)
    final, meta_path = folder / "pairs.jsonl", folder / "meta.json"
    parts = folder / f"parts-{augmenter.chunk_size}"  # a changed chunk size starts its own chunk files
    if final.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        rows = _read_rows(final)
        augmenter.stats["cache_hits"] += 1
        augmenter.last_report = FilterReport.from_dict(meta["report"])
        log.info("pairs: reusing %d cached %s pairs from %s", len(rows), augmenter.method, final)
        _require_kept(augmenter, meta["report"], final)
        return PairResult(rows, meta["report"], final, True, meta)

    settings = augmenter.settings()
    request = {"format": FORMAT_VERSION, "method": augmenter.method, "name": augmenter.name,
               "generator": augmenter.generator, "settings": settings, "seed": seed, "n_texts": len(texts),
               "chunk_size": augmenter.chunk_size, "skipped_sources": skipped}
    if not (folder / "request.json").exists():
        write_durable(folder / "request.json", json.dumps(request, indent=2, ensure_ascii=False, default=str))
    starts = list(range(0, len(texts), augmenter.chunk_size))
    done = {s for s in starts if (parts / f"{s:09d}.json").exists()}
    n_done = sum(min(augmenter.chunk_size, len(texts) - s) for s in done)
    if done:
        log.info("pairs: resuming %s: %d of %d chunks already on disk", folder.name, len(done), len(starts))
    provenance = {"method": augmenter.method, "generator": augmenter.generator, "seed": seed}
    t0 = time.perf_counter()
    bar = tqdm(total=len(texts), initial=n_done, unit="text", desc=f"{augmenter.name} pairs",
               disable=not show_progress, dynamic_ncols=True, smoothing=0.1)
    try:
        for s in starts:
            if s in done:
                continue
            chunk = texts[s:s + augmenter.chunk_size]
            result = augmenter.generate_chunk(chunk, s, seed, progress=bar.update)
            rows = []
            for r in result.rows:
                i = r.pop("index")
                rows.append({"anchor": r.pop("anchor"), "positive": r.pop("positive"), "source_id": ids[i],
                             **provenance, **r})
            write_durable(parts / f"{s:09d}.json",
                          json.dumps({"start": s, "rows": rows, "report": result.report.to_dict()},
                                     ensure_ascii=False))
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0

    rows, report = [], FilterReport()
    for s in starts:
        part = json.loads((parts / f"{s:09d}.json").read_text(encoding="utf-8"))
        rows.extend(part["rows"])
        report.add(FilterReport.from_dict(part["report"]))
    compact = row_settings(settings)
    for r in rows:
        r["settings"] = compact
    write_rows(final, rows)
    n_new = len(texts) - n_done
    meta = {**request, "report": report.to_dict(), "n_pairs": len(rows), "generated_now": n_new,
            "seconds": round(elapsed, 2), "texts_per_s": round(n_new / elapsed, 3) if elapsed > 0 and n_new else None,
            "stats": dict(augmenter.stats)}
    write_durable(meta_path, json.dumps(meta, indent=2, ensure_ascii=False, default=str))
    for leftover in folder.glob("parts-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    augmenter.last_report = report
    log.info("pairs: %s %s -> %s", augmenter.name, report.summary(), final)
    _require_kept(augmenter, meta["report"], final)
    return PairResult(rows, meta["report"], final, False, meta)


def _require_kept(augmenter, report: dict, final: Path) -> None:
    """Warn when under half the views passed the filters; raise when none did."""
    if report["n_kept"] > 0:
        if report["kept_share"] < 0.5:
            log.warning("pairs: only %d of %d %s views passed the filters", report["n_kept"], report["n_sources"],
                        augmenter.method)
        return
    hint = getattr(augmenter, "empty_hint", "") or ("Loosen augmentation.filters, raise augmentation.retries or "
                                                     "max_new_tokens, or use a stronger generator model")
    raise EmbedkitError(
        f"all {report['n_sources']} {augmenter.method} outputs were filtered out, no pair survived "
        f"({FilterReport.from_dict(report).summary()}). {hint} (cached set: {final})")
