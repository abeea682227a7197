"""Stage 5, train: Ray Train + DeepSpeed ZeRO contrastive pretraining. See stage.py."""

from pipelines.train.stage import TrainConfig, fingerprint_of, main, run_training

__all__ = ["TrainConfig", "fingerprint_of", "main", "run_training"]
