"""The OpenAI/DeepSeek front door, pure (no Ray): one owner per concern.

http_input (body and header checks before parsing), protocol (request parsing onto SamplingParams), limits (bounds
and admission), responses (response and SSE shapes), errors (the OpenAI error object), tokenize (/tokenize and
/detokenize). Import the module you need; this package re-exports nothing.
"""
