"""K trainable LoRA adapters attached to one frozen base model at once: the co-training side of the slot bank.

Every targeted linear layer of the base is wrapped in a `BatchedLoraLinear`, which adds the batched-LoRA
operator's delta (`LoraBatch.delta`, the same plan as serving) for the rows of the current batch. All adapters'
weights live in one tensor `storage` [K + 1, F] (slot 0 all zeros = no adapter; slot k = adapter k - 1), in one
shared layout: per targeted module an A block [r_max, in] and a B block [out, r_max]. An adapter of lower rank, or
one that does not target a module, leaves its part of those blocks zero, and they stay zero in training (their
gradients are exactly zero: the matching B columns or A rows are zero), so each adapter trains exactly its own
LoRA. `storage` is the autograd leaf (one backward fills every adapter's gradient, no per-step stacking copy);
`parameters(k)` is adapter k's row of it as its own `nn.Parameter`, for its own optimizer. The LoRA scale
(alpha / r, or alpha / sqrt(r) with rsLoRA) multiplies each row's delta in the forward (`delta`), as PEFT's
`lora_B(lora_A(x)) * scaling` does, so the optimizer sees the same parameters as PEFT's and no scaled copy of any
weight is made (a copy of every B per module per forward, kept for backward, would cost about as much memory as
all adapters' B matrices: on a 7B base with 16 adapters, on the order of a GB).

`peft_initial_weights` gives each adapter the initial weights PEFT gives it in a solo run with the same seed.

    python -m adapters.trainable_lora     # attach 3 adapters to the tiny model and print the layout
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.batched_lora import LoraBatch
from adapters.lora_files import META_BASE_FINGERPRINT, META_BASE_NAME, WEIGHTS_FILE
from adapters.lora_layer import BatchedLoraLinear

PEFT_PREFIX = "base_model.model."


def peft_initial_weights(model: torch.nn.Module, shape: AdapterShape) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) per module that PEFT gives this adapter in a solo run: seed the global RNG as the solo run does
    (`jobs.model_setup`), let PEFT inject its LoRA layers into `model`, copy their weights, and take the layers
    out again. So a co-trained adapter starts from the very weights it would start from alone, whatever PEFT's
    init scheme and module order."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=shape.dropout,
                        target_modules=list(shape.targets), use_rslora=shape.use_rslora, bias="none")  # fmt: skip
    had_config = hasattr(model, "peft_config")
    torch.manual_seed(shape.seed)
    inject_adapter_in_model(config, model)
    if not had_config and hasattr(model, "peft_config"):
        del model.peft_config  # (PEFT leaves its config on the model; the next adapter would be a second one)
    weights = {}
    for name, module in list(model.named_modules()):
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a:
            continue
        a, b = lora_a["default"].weight, module.lora_B["default"].weight  # type: ignore[union-attr, index]
        weights[name] = (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())  # type: ignore[operator]
    return weights


@dataclass(frozen=True)
class AdapterShape:
    """One co-trained adapter's LoRA hyperparameters."""

    name: str
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # projection names, e.g. ("q_proj", "v_proj")
    seed: int
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class _Block:
    name: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    fan_in: int
    fan_out: int
    a_offset: int
    b_offset: int


class TrainableLoraBank:
    def __init__(self, model: torch.nn.Module, adapters: list[AdapterShape], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        if not adapters:
            raise ValueError("co-training needs at least one adapter")
        self.adapters = list(adapters)
        self.rank = max(a.r for a in adapters)
        wanted = {t for a in adapters for t in a.targets}
        modules = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in wanted and _is_linear(m)]
        if not modules:
            raise ValueError(f"the base model has no linear layer named {sorted(wanted)}")
        self.blocks: list[_Block] = []
        offset = 0
        for name, module in modules:
            fan_in, fan_out = _fan(module)
            self.blocks.append(_Block(name, fan_in, fan_out, offset, offset + self.rank * fan_in))
            offset += self.rank * (fan_in + fan_out)
        slots = len(adapters) + 1
        self.storage = torch.zeros(slots, offset, dtype=dtype, device=device, requires_grad=True)
        self._params = [torch.nn.Parameter(self.storage.detach()[k + 1]) for k in range(len(adapters))]
        self.scales = torch.tensor([0.0] + [a.scale for a in adapters], dtype=dtype, device=device)
        self.dropouts = torch.tensor([0.0] + [a.dropout for a in adapters], dtype=dtype, device=device)
        self._views = {b.name: self._block_views(b) for b in self.blocks}
        self.plan: LoraBatch | None = None
        self.token_slots: torch.Tensor | None = None
        self.row_scales: torch.Tensor | None = None  # [tokens, 1]: each token row's adapter scale
        self.dropout: float | torch.Tensor = 0.0  # the current rows' rate, or per token row the keep probability
        for k, shape in enumerate(adapters):  # (before wrapping: PEFT injects into the plain base)
            self._initialise(k, peft_initial_weights(model, shape))
        for name, module in modules:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, BatchedLoraLinear(module, self, name))

    def _block_views(self, block: _Block) -> tuple[torch.Tensor, torch.Tensor]:
        slots, r = self.storage.shape[0], self.rank
        a = self.storage[:, block.a_offset : block.a_offset + r * block.fan_in].view(slots, r, block.fan_in)
        b = self.storage[:, block.b_offset : block.b_offset + block.fan_out * r].view(slots, block.fan_out, r)
        return a, b

    def _targets(self, k: int) -> list[_Block]:
        wanted = set(self.adapters[k].targets)
        return [b for b in self.blocks if b.name.rsplit(".", 1)[-1] in wanted]

    # -- weights -------------------------------------------------------------------------------------------------
    def parameters(self, k: int) -> list[torch.nn.Parameter]:
        """Adapter k's weights as one flat parameter (a view of its storage row), for its own optimizer."""
        return [self._params[k]]

    def link_grad(self, k: int) -> None:
        """Point adapter k's parameter at its row of the shared gradient (call after backward, before its step)."""
        grad = self.storage.grad
        self._params[k].grad = None if grad is None else grad[k + 1]

    def zero_grad(self, k: int) -> None:
        if self.storage.grad is not None:
            self.storage.grad[k + 1].zero_()
        self._params[k].grad = None

    @torch.no_grad()
    def _initialise(self, k: int, initial: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        r = self.adapters[k].r
        targets = self._targets(k)
        if {b.name for b in targets} != set(initial):
            raise ValueError(f"adapter {self.adapters[k].name}: PEFT targets {sorted(initial)[:3]}..., expected "
                             f"{[b.name for b in targets][:3]}...")  # fmt: skip
        for block in targets:
            a, b = self._views[block.name]
            a[k + 1, :r].copy_(initial[block.name][0])
            b[k + 1, :, :r].copy_(initial[block.name][1])

    def weights(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [S, r, in], B [S, out, r]) of one module: views of `storage`, without the LoRA scale."""
        return self._views[module_name]

    def delta(self, module_name: str, x: torch.Tensor) -> torch.Tensor:
        """The current rows' LoRA delta of one module, x [N, in] -> [N, out]: (x @ A.T @ B.T) * scale, each row with
        its own adapter's weights and scale (PEFT's order). Differentiable; autograd keeps no copy of any weight
        (the scale is a [N, 1] constant)."""
        a, b = self._views[module_name]
        return self.plan.delta(x, a, b) * self.row_scales  # type: ignore[union-attr, operator]

    # -- which rows use which adapter ----------------------------------------------------------------------------
    def use(self, row_slots: torch.Tensor, seq_len: int) -> None:
        """The next forward's rows: row i (of seq_len tokens) uses slot row_slots[i] (adapter k = slot k + 1)."""
        tokens = row_slots.repeat_interleave(seq_len)
        self.token_slots = tokens
        self.plan = LoraBatch(tokens, cache_gathers=False)
        self.row_scales = self.scales.index_select(0, tokens.to(self.scales.device))[:, None]
        rates = {self.adapters[s - 1].dropout for s in self.plan.distinct}
        # one rate for every row: plain dropout; several: each token row kept with its own adapter's rate
        self.dropout: float | torch.Tensor = rates.pop() if len(rates) == 1 else (1 - self.dropouts[tokens])[:, None]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The plain base model: no LoRA delta in any forward inside the block (evaluation of the base, serving)."""
        plan, slots = self.plan, self.token_slots
        self.plan = self.token_slots = None
        try:
            yield
        finally:
            self.plan, self.token_slots = plan, slots

    # -- files: the same safetensors + adapter_config.json a solo PEFT run writes --------------------------------
    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        r = self.adapters[k].r
        out = {}
        for block in self._targets(k):
            a, b = self._views[block.name]
            out[f"{PEFT_PREFIX}{block.name}.lora_A.weight"] = a[k + 1, :r].detach().to("cpu").contiguous()
            out[f"{PEFT_PREFIX}{block.name}.lora_B.weight"] = b[k + 1, :, :r].detach().to("cpu").contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict(k)
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"adapter {self.adapters[k].name}: weights do not fit (missing {missing[:2]}, "
                             f"unexpected {extra[:2]})")  # fmt: skip
        r = self.adapters[k].r
        self.storage[k + 1].zero_()
        for block in self._targets(k):
            a, b = self._views[block.name]
            a[k + 1, :r].copy_(tensors[f"{PEFT_PREFIX}{block.name}.lora_A.weight"])
            b[k + 1, :, :r].copy_(tensors[f"{PEFT_PREFIX}{block.name}.lora_B.weight"])

    def save(self, k: int, folder: Path, base_name: str, fingerprint: str, base_path: str | None = None) -> Path:
        from peft import LoraConfig

        shape = self.adapters[k]
        folder.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=shape.dropout,
                            target_modules=list(shape.targets), use_rslora=shape.use_rslora, bias="none",
                            task_type="CAUSAL_LM", base_model_name_or_path=base_path)  # fmt: skip
        config.save_pretrained(str(folder))
        metadata = {"format": "pt", META_BASE_NAME: base_name, META_BASE_FINGERPRINT: fingerprint}
        save_file(self.state_dict(k), str(folder / WEIGHTS_FILE), metadata=metadata)
        return folder

    def load(self, k: int, folder: Path) -> None:
        self.load_state_dict(k, load_file(str(folder / WEIGHTS_FILE)))


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def _fan(module: torch.nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def main() -> None:
    from adapters.base_models import QuantizationConfig, load_base

    base = load_base("tiny-llama", QuantizationConfig(mode="none"))
    shapes = [AdapterShape("a", 4, 8, 0.0, ("q_proj", "v_proj"), 0), AdapterShape("b", 8, 16, 0.0, ("down_proj",), 1),
              AdapterShape("c", 2, 4, 0.1, ("q_proj", "k_proj", "v_proj", "o_proj"), 2)]  # fmt: skip
    bank = TrainableLoraBank(base.model, shapes)
    print(f"{len(bank.blocks)} wrapped modules, storage {tuple(bank.storage.shape)} (r_max {bank.rank})")
    for k, shape in enumerate(shapes):
        print(f"  {shape.name}: r={shape.r} targets={shape.targets} tensors={len(bank.state_dict(k))}")


if __name__ == "__main__":
    main()
