"""The ``embedkit-pairs`` command: generate synthetic positive pairs from a file of texts, once.

    embedkit-pairs sentences.txt -a noise -o pairs.jsonl
    embedkit-pairs train.jsonl -a paraphrase temperature=0.8 --limit 200
    python -m embedkit.commands.pairs ...                  # the same without the console script

It reads a JSONL or plain-text source (:func:`read_source`), refuses test/evaluation splits unless
``--allow-test-split`` is given (:func:`guard_source`), composes the augmentation config with the given
``key=value`` overrides (:func:`build_augmenter`) and fills the pair store
(:mod:`embedkit.augment.store`) with a progress bar in texts/s; the same command later reads the finished
set from the cache or resumes an interrupted one. Input errors print one line on stderr and exit with
code 2; Ctrl-C exits with 130, SIGTERM with 143, keeping the chunks already written.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from embedkit.commands.common import offline_by_default, quiet_libraries, user_errors_as_messages

offline_by_default()  # before anything that may import transformers

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from embedkit.augment.store import write_rows  # noqa: E402
from embedkit.errors import EmbedkitError, find_user_error, interrupts_as_messages  # noqa: E402
from embedkit.io import iter_lines, parse_jsonl_line  # noqa: E402

__all__ = ["Source", "build_augmenter", "guard_source", "main", "read_source"]

log = logging.getLogger(__name__)

_TEST_NAME = re.compile(r"(^|[_\-.])(test|testing|eval|evaluation)($|[_\-.])", re.IGNORECASE)
_TRAIN_NAME = re.compile(r"(^|[_\-.])(train|training)($|[_\-.])", re.IGNORECASE)


def guard_source(path: str | Path, labelled: bool, allow_test_split: bool = False) -> None:
    """Refuse to make training pairs from evaluation text unless ``allow_test_split``.

    Refused: a file whose name or folder says test/eval (``test.jsonl``, ``clinc150/test.jsonl``,
    ``eval_sentences.txt``, ``.../test/...``), and a labelled clustering file (rows with ``text`` and
    ``label``) whose name does not say train (``arxiv/s2s.jsonl`` *is* an evaluation set): training on the
    texts you cluster later inflates the score. Returns None when the source may be used (with a warning
    when only the override lets it through); raises :class:`EmbedkitError` naming the reason otherwise.
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
    ``limit`` keeps the first N usable rows. Returns a :class:`Source`.
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
    """' (lines 2, 3, 7, ...)' for a warning: the first five line numbers, or '' for none."""
    if not numbers:
        return ""
    head = ", ".join(map(str, numbers[:5]))
    return f" (line{'s' if len(numbers) > 1 else ''} {head}{', ...' if len(numbers) > 5 else ''})"


def build_augmenter(method: str, overrides: Sequence[str] = ()):
    """Compose ``conf/augmentation/<method>.yaml`` with ``key=value`` overrides and instantiate it.

    Returns (the augmenter, the composed config); a bad method or override raises :class:`EmbedkitError`.
    """
    if method == "none":
        raise EmbedkitError("augmentation 'none' uses the given pairs and generates nothing; pick noise, crop, "
                            "first_rest, dropout, paraphrase, backtranslation, mix or mix_cheap")
    ov = [f"augmentation={method}"] + [o if o.startswith(("augmentation.", "+augmentation.", "~augmentation."))
                                       else f"augmentation.{o}" for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("embedkit.conf", version_base="1.3"):
            cfg = compose("config", overrides=ov)
        return instantiate(cfg.augmentation), cfg
    except (HydraException, OmegaConfBaseException) as e:
        user = find_user_error(e)
        if user is not None:
            raise user from None
        raise EmbedkitError(f"bad augmentation config ({' '.join(ov)}): {str(e).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def _parser() -> argparse.ArgumentParser:
    """The command line of ``embedkit-pairs``."""
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
                   help="option of the augmentation group: noise, crop, first_rest, dropout, paraphrase, backtranslation, mix, mix_cheap (default: paraphrase)")
    p.add_argument("-o", "--out", help="write the pair file here too (JSONL); the cached copy is always kept")
    p.add_argument("--field", help="JSONL field holding the text (default: text, anchor or sentence)")
    p.add_argument("--limit", type=int, help="use only the first N usable rows")
    p.add_argument("--max-chars", type=int, default=None,
                   help="skip source lines longer than this (default: the method's max_source_chars)")
    p.add_argument("--seed", type=int, default=0, help="seed for instruction choice, sampling and noise (default 0)")
    p.add_argument("--cache-dir", default=None,
                   help="pair cache (default: paths.pair_cache, i.e. $EMBEDKIT_OUTPUTS or outputs, then /cache/pairs)")
    p.add_argument("--allow-test-split", action="store_true",
                   help="allow a source that looks like a test/evaluation split (you must not evaluate on it then)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``embedkit-pairs`` with ``argv`` (default: the command line); returns the exit code, 0 on success.

    Errors in the input print one line on stderr and exit with code 2; Ctrl-C and SIGTERM exit with 130
    and 143, keeping the finished chunks.
    """
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    with interrupts_as_messages("embedkit-pairs", "the chunks already written are kept and the same command "
                                "resumes from there"):
        with user_errors_as_messages("embedkit-pairs"):
            return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    """Read the source, make (or reuse) the pair set, write ``--out`` and print one summary line; returns 0."""
    augmenter, cfg = build_augmenter(args.augmentation, args.overrides)
    max_chars = args.max_chars or getattr(augmenter, "max_source_chars", 2000)
    if args.max_chars:
        augmenter.max_source_chars = args.max_chars
        for sub in getattr(augmenter, "methods", {}).values():
            sub.max_source_chars = args.max_chars
    source = read_source(args.source, args.field, max_chars=max_chars, limit=args.limit)
    guard_source(source.path, source.labelled, args.allow_test_split)
    cache_dir = Path(args.cache_dir or cfg.paths.pair_cache)  # the folder training runs use too
    t0 = time.perf_counter()
    rows = augmenter.make_pairs(source.texts, cache_dir, seed=args.seed, ids=source.ids,
                                show_progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    if args.out:
        for r in rows:
            r.setdefault("source_file", str(source.path))
        write_rows(Path(args.out), rows)
    report = augmenter.last_report
    members = [augmenter, *getattr(augmenter, "methods", {}).values()]
    cached = sum(m.stats.get("generated_texts", 0) for m in members) == 0
    print(f"embedkit-pairs: {len(rows)} {augmenter.name} pairs from {len(source.texts)} texts of {source.path} "
          f"({report.summary() if report else ''}); "
          f"{'read from the cache' if cached else f'{elapsed:.1f} s, {len(source.texts) / elapsed:.2f} texts/s'}"
          f"{f'; written to {args.out}' if args.out else ''}; cache: {cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
