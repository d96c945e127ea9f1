"""The model layer: unlearning layers and how they attach to a transformers model, where a model
family keeps its blocks, hidden states and output head, and the fused trunk ops used while training.
Imports only :mod:`unlearn_fast.ops` (and :mod:`unlearn_fast.errors`)."""
