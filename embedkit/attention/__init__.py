"""Where the final token's attention goes (prompt words vs the text's own words), per layer, for the base
model and tuned adapters: `embedkit-attention` (config ``attention.yaml``; the command is
``embedkit.commands.attention``).

Modules: ``measure`` (token roles, final-token rows, shares, examples, aggregates), ``layers`` (the
``attention.layers`` spec), ``variants`` (variant specs, adapter checks, loading with eager attention),
``figures`` (the PNGs), ``outputs`` (the CSVs and the printed summary) and ``analysis`` (``run_attention``,
the whole job)."""

from embedkit.attention.measure import (
    HEAD_REDUCTIONS, PROMPT, SPECIAL, TEXT, Aggregate, Example, Shares, final_token_rows, require_eager,
    run_aggregate, run_examples, shares, token_label, token_roles,
)
from embedkit.attention.layers import check_layer_spec, layer_description, parse_layers
from embedkit.attention.variants import Variant, adapter_files, check_adapter, load_eager, load_variants, parse_variants
from embedkit.attention.figures import aggregate_figure, example_figure, save_figure
from embedkit.attention.outputs import example_summary, print_summary, write_aggregate_csvs, write_tokens_csv
from embedkit.attention.analysis import run_attention

__all__ = [
    "HEAD_REDUCTIONS", "PROMPT", "SPECIAL", "TEXT", "Aggregate", "Example", "Shares", "Variant", "adapter_files",
    "aggregate_figure", "check_adapter", "check_layer_spec", "example_figure", "example_summary",
    "final_token_rows", "layer_description", "load_eager", "load_variants", "parse_layers", "parse_variants",
    "print_summary", "require_eager", "run_aggregate", "run_attention", "run_examples", "save_figure", "shares",
    "token_label", "token_roles", "write_aggregate_csvs", "write_tokens_csv",
]
