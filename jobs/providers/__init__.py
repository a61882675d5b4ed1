"""AI providers: one module per kind (registry maps kinds to classes), plus the simulator.

Keep this package free of Django imports: the simulator runs standalone from it.
"""
