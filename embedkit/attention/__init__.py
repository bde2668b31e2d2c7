"""Where the final token's attention goes (prompt words vs the text's own words), per layer, for the base
model and tuned adapters: `embedkit-attention` (config ``attention.yaml``)."""

from embedkit.attention.measure import final_token_rows, run_attention, shares, token_roles

__all__ = ["final_token_rows", "run_attention", "shares", "token_roles"]
