"""Stage 1, embedding: a loaded backbone, a prompt that wraps each text, the poolings, and the encoder
that turns texts into vectors for every pooling from one forward pass (config groups ``model``,
``prompt``, ``pooling`` and the ``encode`` block); ``peer``: sentence-transformers models evaluated beside them."""

from embedkit.embed.models import Backbone, load_backbone
from embedkit.embed.pooling import BASE_MODES, MODES, Pooling, pool_all
from embedkit.embed.prompts import Prompt, PromptEnsemble, Tokenized, special_prefix, tokenize
from embedkit.embed.encoder import EncodeConfig, Encoder  # noqa: E402 - after what it builds on
from embedkit.embed.peer import PeerBackbone, PeerEncoder, load_peer  # noqa: E402 - sentence-transformers peers

__all__ = ["BASE_MODES", "MODES", "Backbone", "EncodeConfig", "Encoder", "PeerBackbone", "PeerEncoder", "Pooling", "Prompt",
           "PromptEnsemble", "Tokenized", "load_backbone", "load_peer", "pool_all", "special_prefix", "tokenize"]
