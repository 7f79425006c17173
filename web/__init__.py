"""The prompt page: a thin Flask front over the Ray Serve HTTP API (no torch, no model)."""
