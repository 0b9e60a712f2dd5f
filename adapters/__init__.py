"""lorafleet.adapters: what an adapter is, where it lives, how it attaches to a shared base model.

Modules: `base_models` (resolve a base-model reference to model + tokenizer), `smollm2` / `tiny_llama` (the two
bundled bases), `spec` (validating a PEFT LoRA adapter folder), `sources/` (one class per storage backend),
`registry` (resolve a `model` string to an adapter), `batched_lora` (the one batched-LoRA operator),
`slot_bank` (K preallocated adapter slots per layer). Nothing here imports Ray.
"""
