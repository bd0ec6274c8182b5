"""speedrun.optim: NorMuon (Polar Express) and DistAdam, their schedules, and the ``Optimizers``
bundle built from a model's parameter labels (docs/architecture.md, optimizer contract)."""
from speedrun.optim.adam import DistAdam
from speedrun.optim.build import Optimizers, build_optimizers
from speedrun.optim.muon import NorMuon
from speedrun.optim.polar_express import polar_express, polar_express_reference
from speedrun.optim.schedules import (
                                      batch_shape,
                                      final_window_blocks,
                                      lr_multiplier,
                                      mtp_weights,
                                      muon_momentum,
                                      prefix_weight,
                                      stage_at,
                                      window_blocks,
)

__all__ = ["DistAdam", "NorMuon", "Optimizers", "build_optimizers", "polar_express",
           "polar_express_reference", "lr_multiplier", "muon_momentum", "window_blocks",
           "final_window_blocks", "batch_shape", "stage_at", "mtp_weights", "prefix_weight"]
