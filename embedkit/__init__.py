"""embedkit: turn a decoder-only LLM into a text-embedding model and measure it.

The stages, each a package, in the order data flows: ``data`` (clustering sets, pairs) ->
``embed`` (backbone, prompt, pooling, encoder) -> ``augment`` (positive views) and ``train`` (contrastive
LoRA) -> ``evaluate`` (MTEB clustering) -> ``report`` (tables); ``attention`` analyses where the final
token looks. ``run`` is one configured run, ``schema`` checks a config before any work, and ``commands``
holds the console scripts.
"""
