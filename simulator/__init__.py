"""The simulated AI provider: an OpenAI- and Anthropic-compatible HTTP server (`server.py`).

Standalone on purpose: it imports nothing of the project and no Django, so it behaves like a
real provider on the other side of a network (`python -m simulator --port 8100`).
"""
