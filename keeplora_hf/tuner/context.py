"""One task's context: what begin_task, end_task, the feature statistics and the callback work on, built once at each
entry point and passed down (the tuner, its KeepLoRA adapter, that adapter's config and target layers, and which rank
holds each layer's bases when the state is sharded by layer)."""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.lora import LoraLayer
from torch import nn

from .config import KeepLoRAConfig
from .layer import layer_state
from .model import KeepLoRAModel, keeplora_layers, tuner_of
from .state import KeepLoRALayerState
from .state_io import TaskProgress
from .state_sharding import Owners, owns, release_unowned_, state_owners


@dataclass(frozen=True)
class TaskContext:
    network: nn.Module  # the model, unwrapped from DistributedDataParallel and friends
    tuner: KeepLoRAModel
    adapter: str
    config: KeepLoRAConfig
    layers: dict[str, LoraLayer]  # the targets, in module order (every rank walks them in the same order)
    owners: Owners | None  # the rank holding each layer's bases; None: every rank holds every layer's

    @property
    def progress(self) -> TaskProgress:
        return self.tuner.progress(self.adapter)

    def state(self, name: str) -> KeepLoRALayerState:
        return layer_state(self.layers[name], self.adapter)

    def owns(self, name: str) -> bool:
        """Whether this rank computes with layer `name`'s bases (always, unless the state is sharded by layer)."""
        return owns(self.owners, name)

    def release_unowned(self) -> None:
        """Keep only the shapes of the bases this rank does not own (a state loaded whole into a sharded run)."""
        release_unowned_(self.layers, self.adapter, self.owners)


def task_context(model: nn.Module) -> TaskContext:
    """The context of `model`'s one active KeepLoRA adapter (`model` may be wrapped by DistributedDataParallel)."""
    network = getattr(model, "module", model)
    tuner = tuner_of(network)
    adapter = tuner.keeplora_adapter()
    layers = keeplora_layers(network, adapter)
    return TaskContext(network, tuner, adapter, tuner.peft_config[adapter], layers, state_owners(network, layers))
