"""Generate a positive-pair set once, reuse it, resume it: the engine behind ``make_pairs`` and ``embedkit-pairs``.

Cache layout (``cache_dir`` is ``outputs/cache/pairs`` for the command line; the trainer passes its own)::

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

The command line (``embedkit-pairs --help``) reads a JSONL or plain-text source, refuses test splits
unless ``--allow-test-split`` is given, and writes the pair file with a progress bar in texts/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from embedkit.errors import EmbedkitError, interrupts_as_messages
from embedkit.io import atomic_write, iter_lines, parse_jsonl_line

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CACHE = "cache/pairs"  # below paths.output_root


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


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


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
    from tqdm.auto import tqdm

    from embedkit.augment.base import FilterReport

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
    write_durable(final, _jsonl(rows))
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
    if report["n_kept"] > 0:
        if report["kept_share"] < 0.5:
            log.warning("pairs: only %d of %d %s views passed the filters", report["n_kept"], report["n_sources"],
                        augmenter.method)
        return
    from embedkit.augment.base import FilterReport

    raise EmbedkitError(
        f"all {report['n_sources']} {augmenter.method} outputs were filtered out, no pair survived "
        f"({FilterReport.from_dict(report).summary()}). Loosen augmentation.filters, raise "
        f"augmentation.retries or max_new_tokens, or use a stronger generator model (cached set: {final})")


# ------------------------------------------------------------------------------------------- sources
_TEST_NAME = re.compile(r"(^|[_\-.])(test|testing|eval|evaluation)($|[_\-.])", re.IGNORECASE)
_TRAIN_NAME = re.compile(r"(^|[_\-.])(train|training)($|[_\-.])", re.IGNORECASE)


def guard_source(path: str | Path, labelled: bool, allow_test_split: bool = False) -> None:
    """Refuse to make training pairs from evaluation text unless ``allow_test_split``.

    Refused: a file whose name or folder says test/eval (``test.jsonl``, ``clinc150/test.jsonl``,
    ``eval_sentences.txt``, ``.../test/...``), and a labelled clustering file (rows with ``text`` and
    ``label``) whose name does not say train (``arxiv/s2s.jsonl`` *is* an evaluation set): training on the
    texts you cluster later inflates the score.
    """
    p = Path(path)
    hit = p.stem if _TEST_NAME.search(p.stem) else next(
        (d for d in p.parent.parts[-2:] if d.lower() in ("test", "testing", "eval", "evaluation")), None)
    if hit is not None:
        reason = f"its name says it is a test/evaluation split ('{hit}')"
    elif labelled and not _TRAIN_NAME.search(p.stem):
        reason = ("it is a labelled clustering set (rows with text and label) that is not named as a training "
                  "split, so it may be what you evaluate on")
    else:
        return
    if allow_test_split:
        log.warning("pairs: %s: %s; generating anyway because the override was given. Do not evaluate on "
                    "this set after training on pairs made from it.", path, reason)
        return
    raise EmbedkitError(
        f"refusing to make training pairs from {path}: {reason}. Training on evaluation text leaks it into "
        "the model. Use the training split (e.g. clinc150/train.jsonl), or pass --allow-test-split if you "
        "really mean it (and do not evaluate on this set afterwards)")


@dataclass
class Source:
    """Texts read from a source file, their ids (``<file>:<line>`` or the row's ``id``) and what was skipped."""

    path: Path
    texts: list[str]
    ids: list[str]
    field: str | None
    labelled: bool
    skipped: dict


def read_source(path: str | Path, text_field: str | None = None, max_chars: int = 2000,
                limit: int | None = None) -> Source:
    """Read a JSONL (one object per line) or plain-text (one text per line) source file.

    JSONL: the text comes from ``text_field``, else the first of ``text``, ``anchor``, ``sentence``
    present. Blank lines and texts longer than ``max_chars`` are skipped and reported (with their line
    numbers); a malformed line, a missing field or non-UTF-8 bytes stop with the line named.
    ``limit`` keeps the first N usable rows.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise EmbedkitError(f"source {path!r} is not a file; give a .jsonl file (one object per line) or a "
                            ".txt file (one sentence per line)")
    is_jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    texts, ids, blank, huge = [], [], [], []
    used_field, labelled = None, False
    for lineno, line, complete in iter_lines(p):
        if not line.strip():
            blank.append(lineno)
            continue
        sid = f"{p.name}:{lineno}"
        if is_jsonl:
            row = parse_jsonl_line(p, lineno, line, complete, example='{"text": "..."}')
            if used_field is None:
                used_field = text_field or next((k for k in ("text", "anchor", "sentence") if k in row), None)
                if used_field is None:
                    raise EmbedkitError(f"{p}:{lineno}: no text field (keys: {', '.join(row) or 'none'}); "
                                        "pass --field NAME")
                labelled = "label" in row and used_field == "text"
            text = row.get(used_field)
            if not isinstance(text, str):
                raise EmbedkitError(f"{p}:{lineno}: field '{used_field}' is "
                                    f"{'missing' if text is None else type(text).__name__}, expected a string")
            if "id" in row:
                sid = str(row["id"])
        else:
            text = line.rstrip("\r\n")
        if not text.strip():
            blank.append(lineno)
        elif len(text) > max_chars:
            huge.append(lineno)
        else:
            texts.append(text)  # as given: the cache key is over the exact texts the trainer sees too
            ids.append(sid)
            if limit is not None and len(texts) >= limit:
                break
    skipped = {"blank_lines": blank, "too_long_lines": huge}
    if blank or huge:
        log.warning("%s: skipped %d blank line(s)%s and %d line(s) longer than %d characters%s; %d rows kept",
                    p, len(blank), _lines(blank), len(huge), max_chars, _lines(huge), len(texts))
    if not texts:
        raise EmbedkitError(f"{p}: no usable text: {len(blank)} blank line(s), {len(huge)} line(s) longer than "
                            f"{max_chars} characters (raise --max-chars), 0 rows kept")
    return Source(p, texts, ids, used_field, labelled, skipped)


def _lines(numbers: list[int]) -> str:
    if not numbers:
        return ""
    head = ", ".join(map(str, numbers[:5]))
    return f" (line{'s' if len(numbers) > 1 else ''} {head}{', ...' if len(numbers) > 5 else ''})"


# ---------------------------------------------------------------------------------------------- CLI
def build_augmenter(method: str, overrides: Sequence[str] = ()):
    """Compose ``conf/augmentation/<method>.yaml`` with ``key=value`` overrides and instantiate it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    if method == "none":
        raise EmbedkitError("augmentation 'none' uses the given pairs and generates nothing; pick noise, "
                            "paraphrase, backtranslation or mix")
    ov = [f"augmentation={method}"] + [o if o.startswith(("augmentation.", "+augmentation.", "~augmentation."))
                                       else f"augmentation.{o}" for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("embedkit.conf", version_base="1.3"):
            cfg = compose("config", overrides=ov)
        return instantiate(cfg.augmentation), cfg
    except (HydraException, OmegaConfBaseException) as e:
        from embedkit.errors import find_user_error

        user = find_user_error(e)
        if user is not None:
            raise user from None
        raise EmbedkitError(f"bad augmentation config ({' '.join(ov)}): {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedkit-pairs",
        description="Generate synthetic positive pairs (anchor -> positive) from a file of texts, once: the "
                    "result is cached by a hash of (texts, method, settings, seed), an interrupted run resumes, "
                    "and every row records its provenance.",
        epilog="examples:\n"
               "  embedkit-pairs ../shared/data/pairs/wiki1m_subset_unsup/train.jsonl -a paraphrase --limit 200 "
               "-o wiki_para.jsonl\n"
               "  embedkit-pairs ../shared/data/clustering/clinc150/train.jsonl -a noise -o clinc_noise.jsonl\n"
               "  embedkit-pairs sentences.txt -a paraphrase temperature=0.8 max_new_tokens=60 batch_size=32\n"
               "  embedkit-pairs sentences.txt -a backtranslation "
               "'translation_models={to_pivot: Helsinki-NLP/opus-mt-en-de, from_pivot: Helsinki-NLP/opus-mt-de-en}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a .jsonl file (field text/anchor/sentence, or --field) or a .txt file, one text a line")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the augmentation config, e.g. temperature=0.8 (see conf/augmentation/)")
    p.add_argument("-a", "--augmentation", default="paraphrase",
                   help="option of the augmentation group: noise, paraphrase, backtranslation, mix (default: paraphrase)")
    p.add_argument("-o", "--out", help="write the pair file here too (JSONL); the cached copy is always kept")
    p.add_argument("--field", help="JSONL field holding the text (default: text, anchor or sentence)")
    p.add_argument("--limit", type=int, help="use only the first N usable rows")
    p.add_argument("--max-chars", type=int, default=None,
                   help="skip source lines longer than this (default: the method's max_source_chars)")
    p.add_argument("--seed", type=int, default=0, help="seed for instruction choice, sampling and noise (default 0)")
    p.add_argument("--cache-dir", default=None,
                   help="pair cache (default: $EMBEDKIT_OUTPUTS or outputs, then /cache/pairs)")
    p.add_argument("--allow-test-split", action="store_true",
                   help="allow a source that looks like a test/evaluation split (you must not evaluate on it then)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``embedkit-pairs``: errors in the input print one line on stderr and exit with code 2."""
    if os.environ.get("EMBEDKIT_ONLINE") != "1":
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with interrupts_as_messages("embedkit-pairs", "the chunks already written are kept and the same command "
                                "resumes from there"):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    try:
        augmenter, cfg = build_augmenter(args.augmentation, args.overrides)
        max_chars = args.max_chars or getattr(augmenter, "max_source_chars", 2000)
        if args.max_chars:
            augmenter.max_source_chars = args.max_chars
            for sub in getattr(augmenter, "methods", {}).values():
                sub.max_source_chars = args.max_chars
        source = read_source(args.source, args.field, max_chars=max_chars, limit=args.limit)
        guard_source(source.path, source.labelled, args.allow_test_split)
        cache_dir = Path(args.cache_dir or Path(cfg.paths.output_root) / DEFAULT_CACHE)
        t0 = time.perf_counter()
        rows = augmenter.make_pairs(source.texts, cache_dir, seed=args.seed, ids=source.ids,
                                    show_progress=not args.no_progress)
        elapsed = time.perf_counter() - t0
        if args.out:
            for r in rows:
                r.setdefault("source_file", str(source.path))
            write_durable(Path(args.out), _jsonl(rows))
        report = augmenter.last_report
        members = [augmenter, *getattr(augmenter, "methods", {}).values()]
        cached = sum(m.stats.get("generated_texts", 0) for m in members) == 0
        print(f"embedkit-pairs: {len(rows)} {augmenter.name} pairs from {len(source.texts)} texts of {source.path} "
              f"({report.summary() if report else ''}); "
              f"{'read from the cache' if cached else f'{elapsed:.1f} s, {len(source.texts) / elapsed:.2f} texts/s'}"
              f"{f'; written to {args.out}' if args.out else ''}; cache: {cache_dir}")
    except EmbedkitError as e:
        print(f"embedkit-pairs: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
