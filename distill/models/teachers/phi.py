"""Phi teachers (phi-1, phi-1.5, phi-2): parallel blocks (attention and MLP both read one LayerNorm's output),
partial rotary embeddings, q/k/v biases, and an output projection named `dense`."""

from .family import Family

PHI = Family(name="phi", model_types=("phi",), o_proj="dense", block="parallel")
