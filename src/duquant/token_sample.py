"""A fixed-capacity sample of calibration tokens that lives on the model's device and never reads it back.

Calibration offers rows (tokens) to the sample thousands of times per run; on a GPU every data-dependent shape
(``unique``, boolean masks, ``nonzero``) or ``.item()`` is a device->host sync that stalls the forward passes.
Here every offer is a fixed-size sequence of kernels: the buffer has a fixed number of slots, empty slots carry
the key -inf, and the only data-dependent step (dropping empty slots) happens once, in `rows()`.

Which rows stay: the quarter of the capacity with the largest max |value| (outlier carriers: massive activations
sit on few tokens and a random subsample would miss them), the rest by a uniform random key drawn when the row is
offered (priority sampling: a uniform random subset of every other row ever offered, whatever the order).
"""

from __future__ import annotations

import torch

EMPTY = float("-inf")  # the key of an empty slot and of an invalid (non-finite) row: never outranks a real row


class TokenReservoir:
    def __init__(self, capacity: int, width: int, generator: torch.Generator | None = None):
        if capacity < 1:
            raise ValueError(f"a token sample needs capacity >= 1, got {capacity}")
        self.capacity, self.width = capacity, width
        self.generator = generator  # on the rows' device; None draws from the device's default generator
        self.top = capacity // 4  # slots kept for the rows with the largest max |value|
        self._rows: torch.Tensor | None = None  # [capacity + 1, width] float32; the last row is a write-off slot
        self._key: torch.Tensor | None = None  # [capacity + 1] random priority, EMPTY for empty slots
        self._row_max: torch.Tensor | None = None  # [capacity + 1]
        self._order: torch.Tensor | None = None  # [capacity + 1] int64: the row's position in the stream

    def _allocate(self, device: torch.device) -> None:
        n = self.capacity + 1
        self._rows = torch.empty(n, self.width, device=device)  # an empty slot's row is never read
        self._key = torch.full((n,), EMPTY, device=device)
        self._row_max = torch.full((n,), EMPTY, device=device)
        self._order = torch.zeros(n, dtype=torch.long, device=device)

    def offer(self, rows: torch.Tensor, valid: torch.Tensor, row_max: torch.Tensor, order: torch.Tensor) -> None:
        """Offer rows [k, width] (float32), with valid [k] (False: never kept), their max |value| [k] and their
        stream positions [k] (int64, for `rows()` to return the sample in stream order)."""
        k = rows.shape[0]
        if k == 0:
            return
        if self._rows is None:
            self._allocate(rows.device)
        cap = self.capacity
        key = torch.rand(k, generator=self.generator, device=rows.device).masked_fill_(~valid, EMPTY)
        pool_key = torch.cat([self._key[:cap], key])
        pool_max = torch.cat([self._row_max[:cap], row_max.float().masked_fill(~valid, EMPTY)])
        # Priority: a top-`top` row by max |value| beats any random key (keys are < 1); empty / invalid is lowest.
        priority = pool_key.clone()
        if self.top:
            priority.index_fill_(0, pool_max.topk(min(self.top, cap + k)).indices, 2.0)
        priority.masked_fill_(pool_key == EMPTY, EMPTY)
        drop = priority.topk(k, largest=False, sorted=False).indices  # the k rows of the pool that go
        # Exactly as many old slots are dropped as new rows are kept: pair them up in place, without reading the
        # count. Dropped pool positions ascending put the old slots first; new rows with the kept ones first.
        kept = torch.ones(cap + k, dtype=torch.bool, device=rows.device).index_fill_(0, drop, False)[cap:]
        src = torch.argsort((~kept).to(torch.int8), stable=True)
        dst = drop.sort().values.clamp_(max=cap)  # a dropped new row "moves" to the write-off slot `cap`
        self._rows.index_copy_(0, dst, rows.float().index_select(0, src))
        self._key.index_copy_(0, dst, key.index_select(0, src))
        self._row_max.index_copy_(0, dst, pool_max[cap:].index_select(0, src))
        self._order.index_copy_(0, dst, order.index_select(0, src))

    def rows(self) -> torch.Tensor | None:
        """The sample [<= capacity, width] float32 in stream order, None when no valid row was offered. One
        device->host sync (the number of filled slots)."""
        if self._rows is None:
            return None
        cap = self.capacity
        filled = (self._key[:cap] != EMPTY).nonzero().squeeze(1)
        if filled.numel() == 0:
            return None
        filled = filled[self._order.index_select(0, filled).argsort()]
        return self._rows.index_select(0, filled)
