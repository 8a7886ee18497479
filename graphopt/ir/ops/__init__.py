"""Op schemas by domain; each module registers its schemas when imported."""

from graphopt.ir.ops import rotary  # noqa: F401,E402  (registers graphopt::RotaryEmbedding)
