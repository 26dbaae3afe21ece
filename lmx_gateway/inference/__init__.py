"""What every inference dialect shares: from the `model` a client named to the
model serving it (aliases, presets), one module that runs a generation for
every route, and tool calls and schemas checked at the edge.
"""
