"""Op schemas by domain; each module registers its schemas when imported."""
