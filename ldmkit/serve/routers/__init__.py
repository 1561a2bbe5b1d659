"""The HTTP APIs, one APIRouter each (built on first use: FastAPI comes with the `serve` extra): openai, a1111,
native (jobs), admin (keys, audit, metrics) and health (probes, the page and its files)."""
