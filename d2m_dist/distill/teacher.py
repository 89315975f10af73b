"""The frozen dense teacher: one object for the stage trainer and stage-0 calibration.

It owns where the teacher lives (``teacher.placement``): ``resident``, the FLUX
module on this rank's device; ``sharded``, a DeepSpeed ZeRO-3 inference engine
whose weights are partitioned over the ranks and gathered module by module
during the forward; ``offload``, the same with the partitions in host memory.
It also owns how the teacher is called: inputs cast to its weights' dtype (a
bf16 teacher takes bf16 inputs; DeepSpeed switches autocast off inside an engine
in its own bf16 mode, so autocast cannot cast them there), bf16 autocast when
the run asks for it, no gradients, and the block-output taps the feature losses
read.

Every forward of a sharded or offloaded teacher is a collective: all ranks must
call it the same number of times.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from d2m_dist.config import TeacherConfig
from d2m_dist.distill.taps import tapped
from d2m_dist.models.flux import FluxInputs, call_flux, load_teacher
from d2m_dist.models.precision import bf16_autocast
from d2m_dist.parallel.deepspeed_setup import zero3_inference_engine


class FrozenTeacher:
    def __init__(self, cfg: TeacherConfig, device: torch.device, *, autocast_bf16: bool = False, micro_batch: int = 1):
        self.cfg = cfg
        self.device = device
        self.autocast_bf16 = autocast_bf16
        model = load_teacher(cfg)
        if cfg.placement == "resident":
            self.engine = None
            self.module: nn.Module = model.to(device)
        else:
            # handed over from host memory (DeepSpeed places the partitions), in ZeRO-3's own bf16
            # mode for a bf16 teacher: half the memory and offload traffic
            self.engine = zero3_inference_engine(model, offload=cfg.placement == "offload", bf16=cfg.dtype == "bf16",
                                                 micro_batch=micro_batch, on_gpu=device.type == "cuda")
            self.module = self.engine.module
        self.dtype = next(self.module.parameters()).dtype

    @property
    def config(self):
        """The teacher's diffusers config (architecture, guidance embedding)."""
        return self.module.config

    @property
    def model(self) -> nn.Module:
        """What to call: the engine when there is one (its hooks gather the shards), else the module."""
        return self.engine if self.engine is not None else self.module

    def _autocast(self):
        return bf16_autocast(self.device.type, self.autocast_bf16)

    def cast(self, inputs: FluxInputs) -> FluxInputs:
        """Inputs on the teacher's device, floating tensors in its dtype."""
        return inputs.to(self.device, dtype=self.dtype)

    @torch.no_grad()
    def velocity(self, inputs: FluxInputs) -> torch.Tensor:
        with self._autocast():
            return call_flux(self.model, self.cast(inputs))

    @torch.no_grad()
    def velocity_and_features(self, inputs: FluxInputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The velocity and every block-list entry's output (``distill/taps.py`` keys), detached."""
        with tapped(self.module, detach=True) as feats, self._autocast():
            out = call_flux(self.model, self.cast(inputs))
        return out, dict(feats)
