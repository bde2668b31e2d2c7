"""``embedkit-attention``: where the final token looks, before and after fine-tuning.

    embedkit-attention                                          # base model, prompt=cluster, example + stdlib
    embedkit-attention prompt=eol 'attention.texts=["A jaguar was seen near the river."]'
    embedkit-attention model.adapter=outputs/.../adapter        # base and adapter side by side
    embedkit-attention 'attention.variants=[base,{name:step100,adapter:/path/a100},{name:step2k,adapter:/path/a2k}]'
    embedkit-attention data=jsonl data.root=../shared/data/clustering \
        'data.include=[twentynewsgroups/test.jsonl]' attention.n_texts=100 attention.layers=all

A Hydra app over ``conf/attention.yaml``; what is measured is described in ``embedkit.attention.measure``,
the whole job is ``embedkit.attention.analysis.run_attention``. Outputs (in the Hydra run folder,
``outputs/attention/<time>_<model>_<prompt>/``): ``example_<i>.png`` (one panel per variant, side by side)
and ``tokens.csv`` for the example texts; ``aggregate_layers.png``, ``aggregate_layers.csv`` (per task,
variant and layer), ``aggregate.csv`` (per task and variant, at the selected layers),
``aggregate_texts.csv`` (per text) and ``summary.json``. With ``logger=wandb`` the charts, the example rows
and the aggregate also go to one W&B run (job_type ``attention``, group ``attention/<time>``).

Input errors print one message on stderr (no traceback) and exit with code 2; Ctrl-C exits with 130,
SIGTERM with 143 (nothing is resumed).
"""

from __future__ import annotations

from pathlib import Path

from embedkit.commands.common import offline_by_default, quiet_libraries, run_labels, user_errors_as_messages

offline_by_default()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from embedkit.attention.analysis import run_attention  # noqa: E402
from embedkit.attention.outputs import log_attention  # noqa: E402
from embedkit.errors import interrupts_as_messages  # noqa: E402


@hydra.main(version_base="1.3", config_path="pkg://embedkit.conf", config_name="attention")
def _app(cfg: DictConfig) -> None:
    quiet_libraries()
    hc = HydraConfig.get()
    out_dir = Path(cfg.attention.output_dir or hc.runtime.output_dir)
    with user_errors_as_messages("embedkit-attention"):
        summary = run_attention(cfg, out_dir)
        log_attention(instantiate(cfg.logger), summary, *run_labels(hc, "attention"))


def main() -> None:
    """The ``embedkit-attention`` console script: run the Hydra app on ``sys.argv`` (Hydra overrides)."""
    with interrupts_as_messages("embedkit-attention", "nothing is resumed; re-run the same command"):
        _app()


if __name__ == "__main__":
    main()
