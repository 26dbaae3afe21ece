"""LMX's HTTP face: a thin Starlette app that validates requests, routes them
to the supervisor and renders answers and errors in OpenAI's shapes."""

__version__ = "0.1.0"
