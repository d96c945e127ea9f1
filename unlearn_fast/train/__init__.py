"""Training the unlearning layers: data loading and encoding, the EUL objective, subject-token
selection, the teacher step cache, the trainer, checkpoints and data-parallel / FSDP2 running.
Imports :mod:`unlearn_fast.io` and below."""
