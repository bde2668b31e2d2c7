"""Stage 1, embedding: a loaded backbone, a prompt that wraps each text, the poolings, and the encoder
that turns texts into vectors for every pooling from one forward pass (config groups ``model``,
``prompt``, ``pooling`` and the ``encode`` block)."""

from embedkit.embed.models import Backbone, load_backbone
from embedkit.embed.pooling import BASE_MODES, MODES, Pooling, pool_all
from embedkit.embed.prompts import Prompt, Tokenized, special_prefix, tokenize
from embedkit.embed.encoder import EncodeConfig, Encoder  # noqa: E402 - after what it builds on

__all__ = ["BASE_MODES", "MODES", "Backbone", "EncodeConfig", "Encoder", "Pooling", "Prompt", "Tokenized",
           "load_backbone", "pool_all", "special_prefix", "tokenize"]
