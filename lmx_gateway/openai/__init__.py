"""The OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`): their request structs, the translation to a worker Generate
frame, and their answer and chunk shapes.
"""
