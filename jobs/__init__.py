"""lorafleet.jobs: what `ray job submit` runs — fine-tuning sweeps, the per-adapter training loop, evaluation,
the bundled task suite and the sweep configs (`jobs/configs/*.yaml`)."""
