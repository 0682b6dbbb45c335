"""Typed run configuration: dataclass sections (`sections`) loaded from YAML with overrides (`loading`)."""
from mip_dist.config.loading import from_dict, load_config, parse_override, save_config, to_dict, validate
from mip_dist.config.sections import (ATTENTION_IMPLS, PROTOCOLS, AttentionConfig, Config,
                                      ConfigError, DataConfig, EvalConfig, LossConfig, ModelConfig, OptimConfig,
                                      ShardSource, TrainConfig)

__all__ = ["ATTENTION_IMPLS", "PROTOCOLS", "AttentionConfig", "Config", "ConfigError",
           "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig", "ShardSource", "TrainConfig",
           "from_dict", "load_config", "parse_override", "save_config", "to_dict", "validate"]
