"""The LLaMA-family decoder and its configuration."""
from ctxjax.model.config import ModelConfig, model_config_from_dict  # noqa: F401
from ctxjax.model.transformer import Transformer  # noqa: F401
