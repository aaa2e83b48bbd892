"""A mock upstream for the demo, the tests and users' own trials: it speaks OpenAI,
Anthropic and Gemini with deterministic usage, and costs nothing (``mock-upstream``)."""
