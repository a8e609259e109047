"""The small core every technique plugs into: configs, registries, the module walker and the record."""

from deepsqueeze.core.config import (
    StageConfig,
    config_from_dict,
    config_to_dict,
    register_stage,
    registered_stages,
    stage_entry,
)
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_nonzero_params, count_params
from deepsqueeze.core.encoding import Encoding, get_encoding, register_encoding, registered_encodings
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import (
    CompressionRecord,
    Transform,
    get_record,
    record_encoding,
    record_transform,
    register_transform,
    replay_transforms,
)
from deepsqueeze.core.walker import get_submodule, iter_modules, set_submodule

__all__ = [
    "Encoding",
    "Model",
    "StageContext",
    "Task",
    "get_encoding",
    "register_encoding",
    "registered_encodings",
    "CompressionRecord",
    "StageConfig",
    "Transform",
    "config_from_dict",
    "config_to_dict",
    "count_nonzero_params",
    "count_params",
    "get_record",
    "get_submodule",
    "iter_modules",
    "record_encoding",
    "record_transform",
    "register_stage",
    "register_transform",
    "registered_stages",
    "replay_transforms",
    "set_submodule",
    "stage_entry",
]
