"""The model identity tests and benchmarks stamp on results they build without a model."""

from __future__ import annotations

from lungnode.domain import ModelIdentity

DEMO_MODEL = ModelIdentity(
    name="lungnode-demo-cnn",
    version="1.2.0",
    sha256="0123456789abcdef" * 4,
    intended_use="Demonstration of the node; not for diagnosis",
    synthetic=True,
    trained_on="synthetic chest phantoms",
)
