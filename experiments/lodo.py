"""Leave-one-domain-out choice of a training source (or any setting) for the adaptation recipe.

Given fine-tuned runs (``results.json`` of ``experiment=adapt`` with different sources or settings, one
label each) and which evaluation domains each one trained on, it picks for every held-out domain the run
whose mean V-measure over the *other* domains is highest, among runs that never saw the held-out domain,
and reports the held-out sets' scores of that pick beside the peer. A setting that wins only where it was
chosen on its own test sets cannot win here: the held-out domain never votes for itself.

    python experiments/lodo.py --run news=/tmp/lodo/news_s0:news --run wiki=/tmp/lodo/wiki_s0 \\
        --run mix=/tmp/lodo/mix_s0:news --peer /tmp/lodo/minilm \\
        --domain news=twentynewsgroups/test --domain science=arxiv/s2s,arxiv/p2p \\
        --domain banking=banking77/test --domain intents=clinc150/test

``--run LABEL=DIR[:DOMAIN,...]``: a run folder (or several, comma-free, given again under the same label:
their scores are averaged, e.g. seeds) and the evaluation domains its training data came from.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: str) -> dict:
    path = Path(folder)
    return json.loads((path if path.is_file() else path / "results.json").read_text(encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="LABEL=DIR[:DOMAIN,...]")
    ap.add_argument("--domain", action="append", required=True, help="NAME=TASK[,TASK...]")
    ap.add_argument("--peer", help="a peer's run folder (e.g. model=minilm on the same sets)")
    args = ap.parse_args()

    domains = {d.split("=", 1)[0]: d.split("=", 1)[1].split(",") for d in args.domain}
    scores: dict[str, list[dict]] = {}
    seen: dict[str, set[str]] = {}
    for spec in args.run:
        label, rest = spec.split("=", 1)
        folder, _, trained = rest.partition(":")
        scores.setdefault(label, []).append(load(folder)["scores"])
        seen.setdefault(label, set()).update(d for d in trained.split(",") if d)
    unknown = {d for s in seen.values() for d in s} - set(domains)
    if unknown:
        raise SystemExit(f"lodo: unknown domain(s) {sorted(unknown)}; --domain names: {sorted(domains)}")
    # per label and task: the mean over its runs (seeds)
    per_task = {label: {t: statistics.mean(r[t] for r in runs) for t in runs[0]} for label, runs in scores.items()}
    peer = load(args.peer)["scores"] if args.peer else {}

    def domain_mean(label: str, names: list[str]) -> float:
        return statistics.mean(per_task[label][t] for d in names for t in domains[d])

    print("| held-out domain | eligible (never trained on it) | chosen on (other domains) | choice | "
          "held-out set: choice | peer |")
    print("|---|---|---|---|---|---|")
    picks = {}
    for held in domains:
        eligible = [label for label in per_task if held not in seen[label]]
        if not eligible:
            print(f"| {held} | none | - | - | - | - |")
            continue
        # vote only with domains that no eligible run trained on, so no candidate is scored in-domain
        voters = [d for d in domains if d != held and not any(d in seen[label] for label in eligible)]
        choice = max(eligible, key=lambda label: domain_mean(label, voters)) if voters else eligible[0]
        picks[held] = choice
        cells = "; ".join(f"{t} {100 * per_task[choice][t]:.1f}" for t in domains[held])
        peers = "; ".join(f"{100 * peer[t]:.1f}" for t in domains[held] if t in peer) or "-"
        votes = ", ".join(f"{label} {100 * domain_mean(label, voters):.1f}" for label in eligible) if voters else "-"
        print(f"| {held} | {', '.join(eligible)} | {', '.join(voters) or '-'} ({votes}) | **{choice}** | {cells} | {peers} |")
    held_scores = [per_task[picks[d]][t] for d in picks for t in domains[d]]
    peer_scores = [peer[t] for d in picks for t in domains[d] if t in peer]
    if held_scores:
        line = f"\nmean over the held-out sets of the choices: {100 * statistics.mean(held_scores):.1f}"
        if len(peer_scores) == len(held_scores):
            line += f"; peer {100 * statistics.mean(peer_scores):.1f}"
        print(line)
    print("\nevery run, per set (x100; * = trained on that set's domain):")
    tasks = [t for names in domains.values() for t in names]
    print("| run | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for label in per_task:
        marks = {t: "*" if any(t in domains[d] for d in seen[label]) else "" for t in tasks}
        print(f"| {label} ({len(scores[label])} run(s)) | "
              + " | ".join(f"{100 * per_task[label][t]:.1f}{marks[t]}" for t in tasks) + " |")
    if peer:
        print("| peer | " + " | ".join(f"{100 * peer[t]:.1f}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
