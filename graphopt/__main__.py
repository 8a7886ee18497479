"""`python -m graphopt ...`: the `graphopt` command line (`graphopt.cli`)."""

from graphopt.cli import main

raise SystemExit(main())
