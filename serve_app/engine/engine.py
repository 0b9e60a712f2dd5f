"""LoraEngine: heterogeneous continuous batching over one base model and many LoRA adapters.

Each `step()` (1) admits waiting requests while `max_running` and the paged KV cache's free blocks allow (see
`scheduler`; a sequence's blocks for its prompt are taken at admission), pinning their adapters into device slots,
(2) reserves a block for every decoding sequence's next token, preempting the youngest running sequences when
blocks run out (they wait again and are recomputed: same tokens), (3) prefills chunks of several prompts in one
forward within `prefill_token_budget` (`prefill_batch`), (4) runs one decode token for every decoding sequence
together — whatever their adapters — through the batched-LoRA operator (on CUDA: a CUDA graph replayed, see
`decode_graphs`), and (5) samples every row on the device with one host sync (`sampler`). A sequence that finishes
its prompt decodes from the next step. Finished sequences leave at once; their KV blocks return to the free list,
nothing is copied (`paged_kv`).

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
from serve_app.engine import decode_graphs, logprobs, lora_overlap
from serve_app.engine.attention import DecodeAttention, triton_kernels
from serve_app.engine.block_manager import BlockManager
from serve_app.engine.config import EngineConfig, resolve_device
from serve_app.engine.constraints import GrammarError, Grammars
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.model_runner import ModelRunner
from serve_app.engine.outcomes import EngineStats, RequestRejected, check_request
from serve_app.engine.paged_kv import PagedKV
from serve_app.engine.prefill_batch import PrefillPlan, plan_prefill
from serve_app.engine.sampler import sample
from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import SamplingParams, Sequence, State, TokenOutput

log = logging.getLogger(__name__)


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
        self._attention_kernels = triton_kernels(self.device, config.decode_attention)
        static_mode = decode_graphs.resolve_mode(config, self.device, self._attention_kernels is not None)
        self.kv = PagedKV(mc.num_hidden_layers, config.kv_blocks, config.kv_block_size, mc.num_key_value_heads,
                          head_dim, self.max_seq_len, dtype, self.device, scratch=static_mode != "off")  # fmt: skip
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
        self._running: list[Sequence] = []  # admitted (prefill or decode), in admission order
        self._decode: list[Sequence] = []  # decode rows, in batch order (a leaving row's place takes the last one)
        self._by_id: dict[str, Sequence] = {}
        self._decode_plan: tuple[tuple, LoraBatch] | None = None
        self._single_plans: dict[int, LoraBatch] = {}  # slot -> plan for rows that all use it (views only)
        self._bank_version = 0
        self.eos_ids = self._eos_ids()
        self.grammars = Grammars(self.tokenizer, self.runner.vocab_size, self.eos_ids)  # JSON output
        self.steps = 0
        self.generated_tokens = 0
        self.preemptions = 0
        self.static_decode = decode_graphs.build(static_mode, self.runner, self.kv, config, self._attention_kernels,
                                                 self.lora_kernel)  # fmt: skip

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
        check_request(prompt_ids, params, self.max_seq_len, self.runner.vocab_size)
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
        return True

    def fail_all(self, reason: str) -> list[TokenOutput]:
        """After an unexpected error in a step: end every request with an error and reset the batch."""
        outputs = [TokenOutput(seq.request_id, None, "", True, "error", len(seq.prompt_ids), len(seq.output_ids),
                               error=reason) for seq in list(self._by_id.values())]  # fmt: skip
        for seq in list(self._by_id.values()):
            if seq.state is State.WAITING:
                self.scheduler.remove(seq.request_id)
            self._finish(seq, "error")
        self._running, self._decode = [], []
        self.kv.blocks = BlockManager(self.kv.num_blocks, self.kv.block_size)  # whatever the failed step left
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
            running=len(self._running),
            waiting=self.scheduler.waiting_count,
            resident_adapters=self.bank.resident(),
            registered_adapters=len(self.adapters),
            adapter_loads=self.bank.loads,
            adapter_evictions=self.bank.evictions,
            steps=self.steps,
            generated_tokens=self.generated_tokens,
            kv_blocks=self.kv.num_blocks,
            kv_blocks_free=self.kv.num_free,
            preemptions=self.preemptions,
        )

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[TokenOutput]:
        with self.overlap.threads():  # PyTorch's thread count for the engine's own work only (lora_overlap)
            return self._step()

    def _step(self) -> list[TokenOutput]:
        now = time.monotonic()  # requests past their deadline end first, freeing their blocks
        overdue = [s for s in self._by_id.values() if s.overdue(now)]
        outputs = [TokenOutput.expired(s) for s in overdue if self.abort(s.request_id)]
        self._admit()
        self._reserve()
        prefilling = sorted((s for s in self._running if s.state is State.PREFILL), key=lambda s: s.arrival)
        plan = plan_prefill(prefilling, self.config.prefill_budget, self.config.prefill_chunk, self.kv, self.device)
        rows = list(self._decode)
        logits, sampled = [], []
        if plan is not None:
            logits.append(self._prefill(plan))
            sampled += [c.seq if c.ends_prefill and not c.seq.output_ids else None for c in plan.chunks]
        if rows:
            logits.append(self._decode_logits(rows))
            sampled += rows
        if logits:
            tokens, finite = sample(torch.cat(logits) if len(logits) > 1 else logits[0], sampled)
            self._take(plan, rows, tokens, finite, outputs)
        self.steps += 1
        return outputs

    def _admit(self) -> None:
        free = self.config.max_running - len(self._running)
        if free <= 0 or not self.scheduler.waiting_count:
            return
        running = {s.adapter_key for s in self._running if s.adapter_id}
        fits = lambda seq: self.kv.can_hold(seq.prefill_target)  # noqa: E731
        for seq in self.scheduler.schedule(free, running, self.bank.can_place, fits=fits,
                                           on_admit=lambda s: self.kv.allocate(s.request_id, s.prefill_target)):  # fmt: skip
            if seq.adapter_id:
                was_resident = self.bank.slot_of(seq.adapter_id) is not None
                seq.lora_slot = self.bank.acquire(seq.adapter_id, self.adapters[seq.adapter_id])
                self._bank_version += 0 if was_resident else 1
            seq.state = State.PREFILL
            self._running.append(seq)

    def _reserve(self) -> None:
        """A block for every decode row's next token; preempt the youngest running sequences if blocks run out."""
        if not self._decode:
            return
        by_age = sorted(self._running, key=lambda s: s.arrival)
        preempted = self.kv.reserve([s.request_id for s in self._decode], [s.request_id for s in by_age])
        for seq in (self._by_id[i] for i in preempted):
            self.preemptions += 1
            self._leave(seq)
            if seq.adapter_id:
                self.bank.release(seq.adapter_id)
            seq.state, seq.prefilled = State.WAITING, 0
            seq.prompt_logprobs = None if not seq.output_ids else seq.prompt_logprobs  # (recomputed with the prompt)
            self.scheduler.add(seq, front=True)

    def _lora_for(self, slots: tuple[int, ...], previous: LoraBatch | None = None) -> LoraBatch | None:
        if not any(slots):
            return None
        if len(set(slots)) == 1:  # every row on one adapter (e.g. a prefill chunk): one reusable plan per slot
            plan = self._single_plans.get(slots[0])
            if plan is None:
                plan = LoraBatch(torch.tensor(slots[:1], device=self.device), self.bank.storage, self.lora_kernel,
                                 slots=list(slots[:1]))  # fmt: skip
                self._single_plans[slots[0]] = plan
            return plan
        idx = torch.tensor(slots, device=self.device)
        return LoraBatch(idx, self.bank.storage, self.lora_kernel, previous=previous, slots=list(slots))

    def _prefill(self, plan: PrefillPlan) -> torch.Tensor:
        """Run the step's prefill chunks; returns the logits of each chunk's last token [chunks, V]."""
        logits = self.runner.prefill(plan.tokens, plan.positions, self._lora_for(plan.slots), plan.attention,
                                     plan.logit_rows)  # fmt: skip
        for chunk in plan.chunks:
            if chunk.want_all:
                logprobs.note_prompt(chunk.seq, logits[chunk.first_row : chunk.first_row + chunk.count], chunk.start)
            chunk.seq.prefilled += chunk.count
        if logits.shape[0] == len(plan.chunks):  # one row per chunk: its last token's
            return logits
        return logits.index_select(0, torch.tensor([c.last_row for c in plan.chunks], device=logits.device))

    def _decode_logits(self, rows: list[Sequence]) -> torch.Tensor:
        for seq in rows:
            self.kv.append(seq.request_id)  # (reserved: cannot run out)
        static = self.static_decode.run(rows) if self.static_decode is not None else None  # (decode_graphs)
        if static is not None:  # static buffers: a CUDA graph replayed, or the same step eagerly
            return static
        tables, lengths = [self.kv.table(s.request_id) for s in rows], [s.length for s in rows]
        attention = DecodeAttention.build(self.kv, tables, lengths, self._attention_kernels, self.device)
        tokens = torch.tensor([s.output_ids[-1] for s in rows], device=self.device)
        positions = torch.tensor([n - 1 for n in lengths], device=self.device)
        key = (tuple(s.lora_slot for s in rows), self._bank_version)
        if self._decode_plan is None or self._decode_plan[0] != key:
            # the old plan's gathered rows stay valid for unchanged rows unless an adapter was loaded since
            old = self._decode_plan[1] if self._decode_plan and self._decode_plan[0][1] == key[1] else None
            plan = self._lora_for(key[0], old)
            self._decode_plan = (key, plan) if plan is not None else None
        lora = self._decode_plan[1] if self._decode_plan else None
        return self.runner.decode(tokens, positions, lora, attention)

    def _take(self, plan: PrefillPlan | None, rows: list[Sequence], tokens: list[int], finite: list[bool],
              outputs: list[TokenOutput]) -> None:  # fmt: skip
        """Apply the step's sampled tokens: prefill chunks first (in plan order), then the decode rows."""
        n = len(plan.chunks) if plan is not None else 0
        for i, chunk in enumerate(plan.chunks if plan is not None else ()):
            seq = chunk.seq
            if seq.state is not State.PREFILL:
                continue
            if not finite[i]:
                self._fail_poisoned(seq, outputs)
            elif chunk.ends_prefill:
                if seq.output_ids:  # recomputed after a preemption: its next token comes from decoding
                    self._join_decode(seq)
                    continue
                seq.first_token_at = time.monotonic()
                if not self._append(seq, tokens[i], outputs):
                    self._join_decode(seq)
        for seq, token, ok in zip(rows, tokens[n:], finite[n:], strict=True):
            if seq.state is not State.DECODE:
                continue
            if ok:
                self._append(seq, token, outputs)
            else:
                self._fail_poisoned(seq, outputs)

    def _fail_poisoned(self, seq: Sequence, outputs: list[TokenOutput]) -> None:
        """Non-finite logits (overflow, e.g. an adapter with huge weights): end the request with an error and zero
        its K/V blocks, so no non-finite value stays in the cache for their next user."""
        self.kv.zero(seq.request_id)
        reason = f"the model produced non-finite values (adapter {seq.adapter_id or 'none'}); request aborted"
        outputs.append(TokenOutput(seq.request_id, None, "", True, "error", len(seq.prompt_ids),
                                   len(seq.output_ids), error=reason))  # fmt: skip
        self._finish(seq, "error")

    def _append(self, seq: Sequence, token: int, outputs: list[TokenOutput]) -> bool:
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
        outputs.append(TokenOutput.for_token(seq, token, text, reason, eos))
        if reason:
            self._finish(seq, reason)
        return reason is not None

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _join_decode(self, seq: Sequence) -> None:
        seq.state = State.DECODE
        self._decode.append(seq)

    def _leave(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch and free its KV blocks (no other sequence moves)."""
        self.kv.free(seq.request_id)
        if seq in self._running:
            self._running.remove(seq)
        if seq.state is State.DECODE and seq in self._decode:
            row = self._decode.index(seq)
            last = self._decode.pop()
            if last is not seq:
                self._decode[row] = last  # the last row takes the leaving row's place (decode plans stay valid)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.state in (State.PREFILL, State.DECODE):
            self._leave(seq)
            if seq.adapter_id:
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
