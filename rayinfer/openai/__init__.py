"""The OpenAI/DeepSeek front door, pure (no Ray): one owner per concern.

http_input (body and header checks before parsing), protocol (request parsing onto SamplingParams), limits (bounds
and admission), responses (response and SSE shapes), errors (the OpenAI error object), tokenize (/tokenize and
/detokenize), structured (response_format / structured_outputs constraints), tool_request (tools and tool_choice),
continuation (chat prefix and FIM prompts), chat_output (a chat choice's reasoning / content / tool-call split, whole and streamed), reasoning and tool_calls
(DeepSeek's output formats, parsed incrementally; markers: their tokens). Import the module you need; this package re-exports nothing.
"""
