"""The ``embedkit`` command: a Hydra app over ``conf/`` (``embedkit --help`` lists the groups).

    embedkit prompt=eol pooling=last                      # one configuration
    embedkit -m prompt=none,eol,cluster pooling=mean,last # a sweep: one results.json per job
    embedkit data=jsonl data.root=/path/to/folder         # your own JSONL clustering sets

Input errors print one message on stderr (no traceback) and exit with code 2; config errors are found
before Hydra creates a run folder (``embedkit.schema``). Ctrl-C exits with 130, SIGTERM with 143, both
after the same cleanup (no partial files).
"""

from __future__ import annotations

import sys
from pathlib import Path

from embedkit.commands.common import offline_by_default, quiet_libraries, run_labels, user_errors_as_messages

offline_by_default()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from embedkit.errors import interrupts_as_messages  # noqa: E402
from embedkit.schema import precheck  # noqa: E402


@hydra.main(version_base="1.3", config_path="pkg://embedkit.conf", config_name="config")
def _app(cfg: DictConfig) -> float:
    quiet_libraries()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    name, group = run_labels(hc, "multirun" if hc.mode.name == "MULTIRUN" else "run")  # the logger's run
    # the run's modules load torch: imported once a composed config runs, so bad command lines fail fast
    from embedkit.run import run
    from embedkit.train.distributed import init_distributed

    init_distributed()  # under torchrun: join the process group before any model work

    with user_errors_as_messages("embedkit"):
        results = run(cfg, run_dir, group, job=hc.job.num if hc.mode.name == "MULTIRUN" else 0, name=name)
    return _objective(results, cfg.get("optimized_metric") or "mean")


def _objective(results: dict, metric: str) -> float:
    """What the run returns to Hydra's sweeper (Optuna maximizes it): ``optimized_metric`` of results.json,
    ``mean`` by default, ``mean_before`` or ``scores.<task>`` (checked against the run's tasks in ``build``)."""
    if metric.startswith("scores."):
        return float(results["scores"][metric[len("scores."):]])
    return float(results[metric])


def main() -> None:
    """The `embedkit` console script: precheck the command line, then run the Hydra app; input errors
    exit 2 with one line, Ctrl-C 130, SIGTERM 143."""
    with interrupts_as_messages("embedkit", "re-run the same command to resume (finished sweep jobs are "
                                "skipped with eval.cache=true; train.resume=true continues training)"):
        with user_errors_as_messages("embedkit"):
            precheck(sys.argv[1:])  # config errors before Hydra makes a run folder
        quiet_libraries()  # also for what a sweeper logs before the first job (Optuna's storage)
        _app()


if __name__ == "__main__":
    main()
