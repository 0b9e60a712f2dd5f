"""`BatchedLoraLinear`: a frozen base linear layer (plain or bitsandbytes 4-bit) plus the batched-LoRA delta of
whichever adapter each row of the batch belongs to. Used by co-training (`adapters.trainable_lora`), where one
forward carries rows of K adapters over one shared base.

    y = base(x) + delta,   delta[n] = (dropout_k(x[n]) @ A_k.T @ B_k.T) * scale_k   for row n of adapter k

The delta comes from the bank (`TrainableLoraBank.delta`: `LoraBatch.delta`, the out-of-place form of the serving
operator, times each row's scale; autograd flows into the bank's `storage`). LoRA dropout is per adapter: each row
is dropped with its own adapter's probability, only in training mode. Without a plan (`bank.disabled()`), the layer is its base layer.
"""

from __future__ import annotations

from typing import Any

import torch


class BatchedLoraLinear(torch.nn.Module):
    def __init__(self, base_layer: torch.nn.Module, bank: Any, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features = int(base_layer.in_features)  # type: ignore[arg-type]
        self.out_features = int(base_layer.out_features)  # type: ignore[arg-type]
        object.__setattr__(self, "_bank", bank)  # not a submodule: the bank is shared by every wrapped layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        bank = self._bank
        plan = bank.plan
        if plan is None or not plan.active:
            return y
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != plan.rows:
            raise RuntimeError(f"{self.module_name}: {flat.shape[0]} tokens but the LoRA plan has {plan.rows} rows")
        flat = flat.to(bank.storage.dtype)
        rate = bank.dropout
        if self.training and isinstance(rate, torch.Tensor):  # rows of adapters with different rates
            flat = flat * ((torch.rand_like(flat) < rate) / rate)
        elif self.training and rate > 0:
            flat = torch.nn.functional.dropout(flat, rate, training=True)
        delta = bank.delta(self.module_name, flat)
        return (y + delta.view(*y.shape[:-1], delta.shape[-1])).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, batched LoRA"
