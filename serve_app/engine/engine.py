"""LoraEngine: heterogeneous continuous batching over one base model and many LoRA adapters.

Each `step()` (1) admits waiting requests into free KV slots (see `scheduler`), pinning their adapters into
device slots, (2) runs one prefill chunk of the oldest sequence still in prefill, and (3) runs one decode token for
every decoding sequence together — whatever their adapters — through the batched-LoRA operator. Finished
sequences leave at once and their KV slots are compacted so decode rows stay a contiguous prefix of the cache.

Plain Python: no Ray, no threads (see `async_engine` for the asyncio wrapper).

    python -m serve_app.engine --base tiny-llama --prompt "hello"      # a few prompts (serve_app/engine/__main__.py)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from adapters import native_lora, triton_runtime
from adapters.base_models import LoadedBase, QuantizationConfig, load_base, torch_dtype
from adapters.batched_lora import LoraBatch
from adapters.lora_files import BaseShapes, LoraWeights, read_lora
from adapters.slot_bank import LoraSlotBank
from serve_app.engine import logprobs, lora_overlap
from serve_app.engine.config import EngineConfig
from serve_app.engine.constraints import GrammarError, Grammars
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.kv_cache import KVCache
from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.outcomes import EngineStats, RequestRejected
from serve_app.engine.sampler import sample
from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import SamplingParams, Sequence, State, TokenOutput

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LoraEngine:
    def __init__(self, base: LoadedBase, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.base = base
        self.tokenizer = base.tokenizer
        model = base.model
        self.device = next(model.parameters()).device
        dtype = torch_dtype(config.dtype, self.device.type) if not base.quantized else model.dtype
        if not base.quantized and model.dtype != dtype:
            model.to(dtype)  # (a model already in `dtype` is left alone: it may carry fp32 LoRA weights)
        self.dtype = dtype
        mc = model.config
        self.shapes = BaseShapes.from_config(mc, base.fingerprint, base.name)
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.max_seq_len = min(config.max_seq_len, getattr(mc, "max_position_embeddings", config.max_seq_len))
        self.kv = KVCache(mc.num_hidden_layers, config.max_running, mc.num_key_value_heads, self.max_seq_len,
                          head_dim, dtype, self.device)  # fmt: skip
        self.bank = LoraSlotBank(self.shapes, config.max_loras, config.max_lora_rank, dtype, self.device)
        self.lora_kernel = config.lora_kernel
        if self.lora_kernel == "triton":  # CUDA, or CPU under the Triton interpreter (tests); else a clear error
            triton_runtime.require(self.device)
        elif self.lora_kernel == "auto" and self.device.type == "cuda":
            triton_runtime.auto_picks(self.device)  # import triton now (auto uses it on CUDA), not in a request
        elif self.lora_kernel == "native":
            native_lora.require(self.device, dtype)
        elif self.lora_kernel == "auto" and self.device.type == "cpu" and dtype == torch.float32:
            native_lora.available()  # build the CPU kernel now (about a second, cached), not in a request
        self.runner = ModelRunner(model, self.kv, self.bank)
        native = self.lora_kernel in ("auto", "native") and self.device.type == "cpu" and dtype == torch.float32
        self.overlap = lora_overlap.choose(config.lora_overlap, native, self.runner, config.max_running,
                                            config.max_loras, config.prefill_chunk, self.lora_kernel)  # fmt: skip
        self.runner.side = self.overlap.worker  # its threads: scoped to each step (see step)
        self.scheduler = Scheduler(config.max_loras, config.starvation_s)
        self.adapters: dict[str, LoraWeights] = {}
        self._unregister_when_idle: set[str] = set()
        self._slots: list[Sequence | None] = [None] * config.max_running
        self._n_decode = 0
        self._by_id: dict[str, Sequence] = {}
        self._decode_plan: tuple[tuple, LoraBatch] | None = None
        self._single_plans: dict[int, LoraBatch] = {}  # slot -> plan for rows that all use it (views only)
        self._bank_version = 0
        self.eos_ids = self._eos_ids()
        self.grammars = Grammars(self.tokenizer, self.runner.vocab_size, self.eos_ids)  # JSON output
        self.steps = 0
        self.generated_tokens = 0

    @classmethod
    def from_base_ref(
        cls, ref: str, config: EngineConfig | None = None, quantization: QuantizationConfig | None = None
    ) -> LoraEngine:
        config = config or EngineConfig()
        device = resolve_device(config.device)
        return cls(load_base(ref, quantization, device=str(device), dtype=config.dtype), config)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(self.base.model.generation_config, "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    # -- adapters ---------------------------------------------------------------------------------------------
    def register_adapter(self, adapter_id: str, source: Path | str | LoraWeights) -> LoraWeights:
        """Validate and keep an adapter on the host; it takes a device slot only when a request needs it.
        Raises `adapters.lora_files.AdapterRejected` with the reason for a bad adapter."""
        weights = (
            source if isinstance(source, LoraWeights) else read_lora(source, self.shapes, self.config.max_lora_rank)
        )
        if weights.rank > self.config.max_lora_rank:
            from adapters.lora_files import AdapterRejected

            raise AdapterRejected(f"rank {weights.rank} exceeds the engine's max_lora_rank {self.config.max_lora_rank}")
        if self.device.type == "cuda":
            weights.modules = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.modules.items()}
        self.adapters[adapter_id] = weights
        self._unregister_when_idle.discard(adapter_id)
        return weights

    def unregister_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; if requests still use it, wait until they finish."""
        if self._in_use(adapter_id):
            self._unregister_when_idle.add(adapter_id)
            return
        self.adapters.pop(adapter_id, None)
        self.bank.evict(adapter_id)

    def _in_use(self, adapter_id: str) -> bool:
        return self.bank.pinned(adapter_id) > 0 or self.scheduler.waiting_for(adapter_id) > 0

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None = None
    ) -> None:
        if request_id in self._by_id:
            raise RequestRejected(f"request id {request_id} is already running", 409)
        if not prompt_ids:
            raise RequestRejected("the prompt is empty", 400, "prompt")
        if params.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1", 400, "max_tokens")
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise RequestRejected(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit "
                f"of {self.max_seq_len} tokens",
                400,
                "max_tokens" if len(prompt_ids) < self.max_seq_len else "messages",
            )
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.runner.vocab_size:
            raise RequestRejected("prompt holds token ids outside the vocabulary", 400, "prompt")
        if params.logit_bias and max(i for i, _ in params.logit_bias) >= self.runner.vocab_size:
            raise RequestRejected("logit_bias holds token ids outside the vocabulary", 400, "logit_bias")
        if adapter_id is not None and adapter_id not in self.adapters:
            raise RequestRejected(f"adapter {adapter_id} is not loaded", 404, "model")
        if self.scheduler.waiting_count >= self.config.max_queue:
            raise RequestRejected(f"the queue is full ({self.config.max_queue} waiting requests)", 429)
        seq = Sequence(request_id, list(prompt_ids), params, adapter_id,
                       IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop))  # fmt: skip
        if params.json_schema is not None:
            try:
                seq.constraint = self.grammars.matcher(params.json_schema)
            except GrammarError as err:
                raise RequestRejected(str(err), 400, "response_format") from None
        self._by_id[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._by_id.get(request_id)
        if seq is None:
            return False
        if seq.state is State.WAITING:
            self.scheduler.remove(request_id)
            self._forget(seq)
        else:
            self._finish(seq, "abort")
            self._compact([seq])
        return True

    def fail_all(self, reason: str) -> list[TokenOutput]:
        """After an unexpected error in a step: end every request with an error and reset the batch."""
        outputs = [TokenOutput(seq.request_id, None, "", True, "error", len(seq.prompt_ids), len(seq.output_ids),
                               error=reason) for seq in list(self._by_id.values())]  # fmt: skip
        for seq in list(self._by_id.values()):
            if seq.state is State.WAITING:
                self.scheduler.remove(seq.request_id)
            self._finish(seq, "error")
        self._slots = [None] * self.config.max_running
        self._n_decode = 0
        self._decode_plan = None
        return outputs

    def has_work(self) -> bool:
        return bool(self._by_id)

    def close(self) -> None:
        """Stop the LoRA side thread, if any; the engine still works afterwards (LoRA in place). Idempotent."""
        self.runner.side = None
        self.overlap.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=sum(s is not None for s in self._slots),
            waiting=self.scheduler.waiting_count,
            resident_adapters=self.bank.resident(),
            registered_adapters=len(self.adapters),
            adapter_loads=self.bank.loads,
            adapter_evictions=self.bank.evictions,
            steps=self.steps,
            generated_tokens=self.generated_tokens,
        )

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        with self.overlap.threads():  # PyTorch's thread count for the engine's own work only (lora_overlap)
            return self._step()

    def _step(self) -> list[TokenOutput]:
        now = time.monotonic()  # requests past their deadline end first, freeing their slots
        overdue = [s for s in self._by_id.values() if s.overdue(now)]
        outputs = [TokenOutput.expired(s) for s in overdue if self.abort(s.request_id)]
        self._admit()
        finished: list[Sequence] = []
        budget = self.config.prefill_chunk  # prompt tokens per step, shared by the oldest prefilling sequences
        prefilling = sorted((s for s in self._slots if s is not None and s.state is State.PREFILL),
                            key=lambda s: s.arrival)  # fmt: skip
        for seq in prefilling:
            if budget <= 0:
                break
            budget -= self._prefill_chunk(seq, budget, outputs, finished)
        rows = self._slots[: self._n_decode]
        if rows:
            self._decode(rows, outputs, finished)  # type: ignore[arg-type]
        self._compact(finished)
        self.steps += 1
        return outputs

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        if not free or not self.scheduler.waiting_count:
            return
        running = {s.adapter_key for s in self._slots if s is not None and s.adapter_id}
        for seq in self.scheduler.schedule(len(free), running, self.bank.can_place):
            if seq.adapter_id:
                was_resident = self.bank.slot_of(seq.adapter_id) is not None
                seq.lora_slot = self.bank.acquire(seq.adapter_id, self.adapters[seq.adapter_id])
                self._bank_version += 0 if was_resident else 1
            seq.kv_slot = free.pop(0)
            seq.state = State.PREFILL
            self._slots[seq.kv_slot] = seq

    def _lora_for(self, slots: tuple[int, ...], previous: LoraBatch | None = None) -> LoraBatch | None:
        if not any(slots):
            return None
        if len(set(slots)) == 1:  # every row on one adapter (e.g. a prefill chunk): one reusable plan per slot
            plan = self._single_plans.get(slots[0])
            if plan is None:
                plan = LoraBatch(torch.tensor(slots[:1], device=self.device), self.bank.storage, self.lora_kernel)
                self._single_plans[slots[0]] = plan
            return plan
        idx = torch.tensor(slots, device=self.device)
        return LoraBatch(idx, self.bank.storage, self.lora_kernel, previous=previous)

    def _prefill_chunk(self, seq: Sequence, budget: int, outputs: list[TokenOutput], finished: list[Sequence]) -> int:
        """Prefill up to `budget` more prompt tokens of `seq`; return how many were processed."""
        chunk = seq.prompt_ids[seq.prefilled : seq.prefilled + budget]
        tokens = torch.tensor(chunk, device=self.device)
        want_all = seq.params.prompt_logprobs is not None
        logits = self.runner.prefill(seq.kv_slot, tokens, seq.prefilled, self._lora_for((seq.lora_slot,)), want_all)
        logits = logprobs.note_prompt(seq, logits, seq.prefilled) if want_all else logits
        seq.prefilled += len(chunk)
        if not bool(torch.isfinite(logits).all()):
            self._fail_poisoned(seq, outputs, finished)
            return len(chunk)
        if seq.prefilled < len(seq.prompt_ids):
            return len(chunk)
        seq.first_token_at = time.monotonic()
        token = sample(logits[None], [seq])[0]
        if not self._append(seq, token, outputs, finished):
            self._join_decode(seq)
        return len(chunk)

    def _decode(self, rows: list[Sequence], outputs: list[TokenOutput], finished: list[Sequence]) -> None:
        tokens = torch.tensor([s.output_ids[-1] for s in rows], device=self.device)
        positions = torch.tensor([s.length - 1 for s in rows], device=self.device)
        key = (tuple(s.lora_slot for s in rows), self._bank_version)
        if self._decode_plan is None or self._decode_plan[0] != key:
            # the old plan's gathered rows stay valid for unchanged rows unless an adapter was loaded since
            old = self._decode_plan[1] if self._decode_plan and self._decode_plan[0][1] == key[1] else None
            plan = self._lora_for(key[0], old)
            self._decode_plan = (key, plan) if plan is not None else None
        lora = self._decode_plan[1] if self._decode_plan else None
        logits = self.runner.decode(tokens, positions, lora)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        for seq, token, ok in zip(rows, sample(logits, rows), finite, strict=True):
            if ok:
                self._append(seq, token, outputs, finished)
            else:
                self._fail_poisoned(seq, outputs, finished)

    def _fail_poisoned(self, seq: Sequence, outputs: list[TokenOutput], finished: list[Sequence]) -> None:
        """Non-finite logits (overflow, e.g. an adapter with huge weights): end the request with an error and zero
        its K/V, which the slot's next user reads behind its attention mask (0 * NaN = NaN would corrupt it)."""
        self.kv.k[:, seq.kv_slot, :, : seq.length] = 0
        self.kv.v[:, seq.kv_slot, :, : seq.length] = 0
        reason = f"the model produced non-finite values (adapter {seq.adapter_id or 'none'}); request aborted"
        outputs.append(TokenOutput(seq.request_id, None, "", True, "error", len(seq.prompt_ids),
                                   len(seq.output_ids), error=reason))  # fmt: skip
        self._finish(seq, "error")
        finished.append(seq)

    def _append(self, seq: Sequence, token: int, outputs: list[TokenOutput], finished: list[Sequence]) -> bool:
        """Record one sampled token; return True if the sequence finished."""
        self.generated_tokens += 1
        reason = None
        eos = token in self.eos_ids and not seq.params.ignore_eos
        if eos:
            reason = "stop"
            text = ""
        else:
            seq.output_ids.append(token)
            text = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_seq_len:
                reason = "length"
        if reason:
            text += seq.detokenizer.flush()
        out = TokenOutput.for_token(seq, token, text, reason, eos)
        outputs.append(out)
        if reason:
            self._finish(seq, reason)
            finished.append(seq)
        return reason is not None

    # -- slot bookkeeping -------------------------------------------------------------------------------------
    def _join_decode(self, seq: Sequence) -> None:
        """Move a sequence that finished prefill to slot n_decode, the end of the contiguous decode block."""
        target = self._n_decode
        if seq.kv_slot != target:
            other = self._slots[target]
            if other is not None:  # another prefilling sequence: swap the two slots' caches
                scratch_k = self.kv.k[:, target, :, : other.prefilled].clone()
                scratch_v = self.kv.v[:, target, :, : other.prefilled].clone()
                self.kv.move(seq.kv_slot, target, seq.length - 1)
                self.kv.k[:, seq.kv_slot, :, : other.prefilled] = scratch_k
                self.kv.v[:, seq.kv_slot, :, : other.prefilled] = scratch_v
                other.kv_slot = seq.kv_slot
                self._slots[other.kv_slot] = other
            else:
                self.kv.move(seq.kv_slot, target, seq.length - 1)
                self._slots[seq.kv_slot] = None
            seq.kv_slot = target
            self._slots[target] = seq
        seq.state = State.DECODE
        self._n_decode += 1

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.adapter_id and seq.state in (State.PREFILL, State.DECODE):
            self.bank.release(seq.adapter_id)
        seq.state = State.FINISHED
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        self._by_id.pop(seq.request_id, None)
        adapter = seq.adapter_id
        if adapter in self._unregister_when_idle and not self._in_use(adapter):
            self._unregister_when_idle.discard(adapter)
            self.adapters.pop(adapter, None)
            self.bank.evict(adapter)

    def _compact(self, finished: list[Sequence]) -> None:
        """Free the KV slots of finished sequences, keeping decode rows contiguous from slot 0."""
        for seq in sorted(finished, key=lambda s: -s.kv_slot):
            slot = seq.kv_slot
            if slot < 0 or self._slots[slot] is not seq:
                continue
            if slot >= self._n_decode:  # still in prefill: outside the decode block
                self._slots[slot] = None
                continue
            last = self._n_decode - 1
            if slot != last:
                mover = self._slots[last]
                assert mover is not None
                self.kv.move(last, slot, mover.length - 1)
                mover.kv_slot = slot
                self._slots[slot] = mover
            self._slots[last] = None
            self._n_decode -= 1
