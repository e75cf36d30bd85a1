"""QuadMamba models: configuration, variants, the network, checkpoint conversion."""
from quadmamba.models.config import QuadMambaConfig, get_config, list_models
from quadmamba.models.quadmamba import (
    PartitionMap, QuadMamba, QuadMambaStage, create_model, init_weights, shift_schedule, window_ids,
)

__all__ = [
    "PartitionMap", "QuadMamba", "QuadMambaConfig", "QuadMambaStage", "create_model", "get_config",
    "init_weights", "list_models", "shift_schedule", "window_ids",
]
