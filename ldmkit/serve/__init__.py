"""Serving models to a team: the HTTP API (OpenAI, AUTOMATIC1111 and native jobs), API keys, the audit trail,
request batching and the web page. Routes only parse and answer; the images come from ldmkit.pipelines."""
