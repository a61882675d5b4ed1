"""The operators' side: dashboard, stats, charts, metrics, health, operator actions' pages."""
