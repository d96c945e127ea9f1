"""Reading and writing: atomic directory writes, the unlearning-artifact format (checksums,
base-model fingerprints, loading layers into a model), and loading a base model from a local
directory or a shipped package. Imports :mod:`unlearn_fast.model` and below."""
