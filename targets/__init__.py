"""graphopt's built-in targets (installed as `graphopt.targets`).

Each target lives in its own module here and registers through the `graphopt.targets`
entry point, exactly as third-party targets do.
"""
