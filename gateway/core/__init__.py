"""Settings, the JSON error, API keys and Prometheus metrics: what every other part of the gateway uses."""
