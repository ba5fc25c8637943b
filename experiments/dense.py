"""Dense decoder-only transformer on the embedded corpus: the default experiment.

``config()`` is a ~100K-parameter model (d_model 64, 2 layers, 4 heads of 16, GELU, tied
embeddings, byte vocabulary) trained with AdamW + cosine at lr 3e-3 for 1e12 FLOPs on the Python
standard-library corpus, seq 128 x batch 32: about 1.1M tokens, half a minute on a 2-core CPU.
``model_for_params(n)`` is the dense size rule of ``scaling.models.family``.
"""

from __future__ import annotations

from scaling.config import BudgetConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from scaling.models import family


def config() -> TrainConfig:
    return TrainConfig(
        experiment="dense",
        model=ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, activation="gelu", tie_embeddings=True),
        data=DataConfig(source="stdlib", seq_len=128, batch_size=32),
        optim=OptimConfig(lr=3e-3, schedule="cosine"),
        budget=BudgetConfig(flops=1e12),
    )


def model_for_params(n_params: float, base: ModelConfig | None = None) -> ModelConfig:
    """A dense shape with about ``n_params`` non-embedding parameters (``family`` rule), other
    settings from ``base`` (default: this experiment's model)."""
    return family.model_for_params(n_params, base if base is not None else config().model)
