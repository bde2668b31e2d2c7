"""Stage 2, training: contrastive LoRA fine-tuning with InfoNCE over in-batch negatives (GradCache for
negatives beyond one forward pass), checkpoints that resume, and the sentence-transformers export
(config groups ``train`` and ``optimizer``)."""

from embedkit.train.losses import info_nce
from embedkit.train.trainer import TrainConfig, Trainer, init_distributed, rank_and_world
from embedkit.train.export import export_sentence_transformers  # noqa: E402

__all__ = ["TrainConfig", "Trainer", "export_sentence_transformers", "info_nce", "init_distributed",
           "rank_and_world"]
