"""The OpenAI-compatible steered server: vLLM's own OpenAI app, plus the
`steering` request object and report, profile endpoints, auth and metrics."""
