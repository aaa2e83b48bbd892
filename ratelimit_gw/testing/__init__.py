"""A mock upstream for the demo, the tests and users' own trials: it speaks OpenAI,
Anthropic and Gemini (text and tool calls) with deterministic usage, and costs nothing
(``mock-upstream``)."""
