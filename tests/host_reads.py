"""A watch for host reads of device values (each one a device->host sync on a GPU) and copies between devices,
for tests that run work on the meta device as a stand-in for a GPU: data-dependent ops fail there, and the watch
records the attempt too."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device value on the host: explicit reads, and ops whose output size depends on the data.
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
              "aten::unique_consecutive", "aten::masked_select", "aten::index.Tensor_bool"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    @property
    def reads(self) -> list[str]:
        return [e for e in self.events if e.split()[0] in HOST_READS]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        if func.name() in HOST_READS and ins - {"cpu"}:  # reading a CPU tensor costs no sync
            self.events.append(func.name())
        if kwargs.get("device") is not None:
            if ins and ins != {torch.device(kwargs["device"]).type}:
                self.events.append(f"{func.name()} {sorted(ins)} -> {kwargs['device']}")
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as err:
            self.events.append(f"{func.name()} failed on the data: {err}")
            raise
