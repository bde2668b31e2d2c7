"""Stage 2, training: contrastive LoRA fine-tuning with InfoNCE over in-batch negatives (GradCache for
negatives beyond one forward pass), checkpoints that resume, and the sentence-transformers export
(config groups ``train`` and ``optimizer``).

Modules: ``config`` (TrainConfig), ``plan`` (TrainingPlan: tokenized pairs and the batch of every step),
``losses`` (info_nce), ``gradcache`` (GradCache, RandContext), ``lora`` (the LoRA model and its
embeddings), ``distributed`` (torchrun helpers), ``trainer`` (Trainer), ``export`` (sentence-transformers),
``model_card`` (the export's README.md), ``hub`` (``train.push_to_hub``).
"""

from embedkit.train.config import TrainConfig
from embedkit.train.distributed import init_distributed, rank_and_world
from embedkit.train.losses import info_nce
from embedkit.train.gradcache import GradCache, RandContext
from embedkit.train.plan import TrainingPlan
from embedkit.runtime import memory_gib
from embedkit.train.trainer import Trainer
from embedkit.train.export import export_sentence_transformers

__all__ = ["GradCache", "RandContext", "TrainConfig", "Trainer", "TrainingPlan", "export_sentence_transformers",
           "info_nce", "init_distributed", "memory_gib", "rank_and_world"]
