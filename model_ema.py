"""The EMA of the weights: timm's ModelEmaV3, and, for an EMA kept in host memory beside a model on a GPU
(--model-ema-force-cpu), `HostModelEma`, whose update never makes the GPU wait."""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import List, Optional

import torch
from timm.utils import ModelEmaV3

import utils


class HostModelEma(ModelEmaV3):
    """ModelEmaV3 kept on the CPU beside a model on an accelerator, with the same result.

    ModelEmaV3 copies each of the model's tensors to the host, blocking, and blends them one by one: hundreds of
    synchronisations per step. Here an update queues one asynchronous copy of the model's state into pinned
    buffers and returns; a worker thread waits for that copy to arrive and blends it in (torch's foreach lerp,
    in update order). Two sets of buffers alternate, so an update only waits for the blend of the update before
    the last one, long done. `synchronize()` waits for the updates in flight: call it before reading `module`."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self._source_device = utils.module_device(model)
        self._buffers: List[Optional[List[torch.Tensor]]] = [None, None]
        self._blends: List[Optional[Future]] = [None, None]
        self._updates = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='ema')

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: Optional[int] = None):
        decay = self.get_decay(step)
        slot = self._updates % 2
        self._updates += 1
        if self._blends[slot] is not None:
            self._blends[slot].result()  # its buffers are free again
        values = list(model.state_dict().values())
        if self._buffers[slot] is None:
            pin = self._source_device.type == 'cuda'
            self._buffers[slot] = [torch.empty_like(v, device='cpu', pin_memory=pin) for v in values]
        buffers = self._buffers[slot]
        for buffer, value in zip(buffers, values):
            buffer.copy_(value, non_blocking=True)
        arrived = None
        if self._source_device.type == 'cuda':
            arrived = torch.cuda.Event()
            arrived.record()
        self._blends[slot] = self._worker.submit(self._blend, buffers, arrived, decay)

    @torch.no_grad()
    def _blend(self, buffers: List[torch.Tensor], arrived, decay: float):
        if arrived is not None:
            arrived.synchronize()
        ema_values, model_values = [], []
        for ema_v, model_v in zip(self.module.state_dict().values(), buffers):
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        if ema_values:
            self._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)

    def synchronize(self):
        """Wait until every update so far is blended in."""
        for blend in self._blends:
            if blend is not None:
                blend.result()

    def set(self, model: torch.nn.Module):
        self.synchronize()
        super().set(model)


def create_model_ema(model: torch.nn.Module, device: Optional[torch.device] = None, **kwargs) -> ModelEmaV3:
    """The EMA of `model` (ModelEmaV3's arguments): a HostModelEma when it is kept on the CPU while the model is on
    CUDA, else ModelEmaV3."""
    if device is not None and torch.device(device).type == 'cpu' and utils.module_device(model).type == 'cuda':
        return HostModelEma(model, device=torch.device('cpu'), **kwargs)
    return ModelEmaV3(model, device=device, **kwargs)


def ema_weights(model_ema: ModelEmaV3) -> torch.nn.Module:
    """The EMA's module, once every update in flight is in it."""
    if isinstance(model_ema, HostModelEma):
        model_ema.synchronize()
    return model_ema.module
