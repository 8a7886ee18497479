"""graphopt's built-in passes (installed as `graphopt.passes`).

Each pass lives in its own module here and registers through the `graphopt.passes` entry
point, exactly as third-party passes do.
"""
