"""AI providers: one module per kind; the registry maps kinds to classes."""
