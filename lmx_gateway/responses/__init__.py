"""The OpenAI Responses API (`/v1/responses`), translated onto the chat path,
with its bounded store for `previous_response_id`.
"""
