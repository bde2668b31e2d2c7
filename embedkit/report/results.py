"""Finished runs and published numbers: scanning folders for ``results.json`` files (broken ones are
skipped and listed), selecting runs, and the reference data files in ``embedkit/report/references/``
(the paper's numbers, the MTEB leaderboard's) with the look-ups the tables make in them."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import yaml

from embedkit.errors import EmbedkitError


# --- reading runs -------------------------------------------------------------------------------------

def check_result(obj) -> str | None:
    """Why ``obj`` is not a usable results.json (None if it is)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("model", "prompt", "pooling", "scores", "mean") if k not in obj]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    if not isinstance(obj["scores"], dict) or not obj["scores"]:
        return "'scores' is not a non-empty object of task -> score"
    bad = [k for k, v in obj["scores"].items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        return f"non-numeric score(s) for {', '.join(bad)}"
    if not isinstance(obj["mean"], (int, float)) or isinstance(obj["mean"], bool):
        return "'mean' is not a number"
    if "train" in obj and not all(k in obj for k in ("mean_before", "scores_before")):
        return "a fine-tuned run without 'mean_before'/'scores_before'"
    return None


def scan(folders: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every results.json under ``folders`` (each a run or sweep folder, or a results.json file).

    Returns (valid results sorted by sweep/job/time, [(path, why)] of broken ones); raises an
    ``EmbedkitError`` for a folder that does not exist or when no valid result is found."""
    results, broken = [], []
    for folder in folders:
        base = Path(folder)
        if not base.exists():
            raise EmbedkitError(f"{folder} does not exist; give a run or sweep folder (e.g. outputs/multirun/<time>)")
        files = [base] if base.is_file() else sorted(base.rglob("results.json"))
        for path in files:
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                broken.append((str(path), f"unreadable ({type(e).__name__}: {e})"))
                continue
            why = check_result(obj)
            if why:
                broken.append((str(path), why))
            else:
                obj.setdefault("run_dir", str(path.parent))
                results.append(obj)
    if not results:
        detail = f" ({len(broken)} broken: see above)" if broken else ""
        raise EmbedkitError(f"no finished runs (results.json) under {', '.join(folders)}{detail}; run a "
                            "configuration or sweep first (e.g. `embedkit -m prompt=none,eol pooling=mean,last`)")
    return sorted(results, key=lambda r: (r.get("sweep") or "", r.get("job", 0), r.get("created", ""))), broken


def load_results(folders: list[str]) -> list[dict]:
    """The valid results under ``folders``; broken ones are listed on stderr."""
    results, broken = scan(folders)
    print_broken(broken)
    return results


def print_broken(broken: list[tuple[str, str]]) -> None:
    """List the ``(path, why)`` pairs of broken runs on stderr (nothing if there are none); returns None."""
    if broken:
        print(f"embedkit-report: skipped {len(broken)} broken run(s):", file=sys.stderr)
        for path, why in broken:
            print(f"  {path}: {why}", file=sys.stderr)


def select_models(results: list[dict], models: list[str] | None, folders: list[str]) -> list[dict]:
    """The results of ``models`` only (all results if None); raises an ``EmbedkitError`` naming any model
    without results under ``folders``."""
    if not models:
        return results
    have = sorted({r["model"] for r in results})
    missing = [m for m in models if m not in have]
    if missing:
        raise EmbedkitError(f"no results for model {', '.join(missing)} under {', '.join(folders)} (models with "
                            f"results: {', '.join(have)}); run its sweep first, e.g. "
                            f"`make table-pooling MODEL={missing[0]}`")
    return [r for r in results if r["model"] in models]


def untuned(results: list[dict]) -> list[dict]:
    """The results of runs without fine-tuning (no ``train`` section)."""
    return [r for r in results if "train" not in r]


def fmt_score(v: float | None, bold: bool = False) -> str:
    """A 0-1 score as V-measure x100 with one decimal (``-`` for none; ``bold``: in Markdown bold)."""
    if v is None:
        return "-"
    return f"**{100 * v:.1f}**" if bold else f"{100 * v:.1f}"


def is_peer(result: dict) -> bool:
    """Whether ``result`` is a peer's run (a sentence-transformers model, ``model=minilm`` or
    ``model=sentence-transformers``: its results.json has a ``peer`` section)."""
    return bool(result.get("peer"))


# --- published numbers --------------------------------------------------------------------------------

def load_references() -> dict:
    """The reference data files shipped in ``embedkit/report/references`` (paper, MTEB leaderboard)."""
    folder = resources.files("embedkit.report") / "references"
    return {name: yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
            for name in ("paper", "mteb_leaderboard")}


def task_set(result: dict, refs: dict) -> str | None:
    """The named MTEB task set a run evaluated (e.g. mteb_clustering_v2), or None for anything else."""
    names = set(result["scores"])
    for name, tasks in refs["mteb_leaderboard"]["task_sets"].items():
        if names == set(tasks):
            return name
    return None


def paper_entry(refs: dict, model: str, prompt: str, pooling: str) -> dict | None:
    """The paper's published entry for (``model``, ``prompt``, ``pooling``) in ``refs``, or None."""
    for e in refs["paper"]["entries"]:
        if (e["model"], e["prompt"], e["pooling"]) == (model, prompt, pooling):
            return e
    return None
