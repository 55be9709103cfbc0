"""Submitting and running jobs: the request schemas and their checks, quotas, idempotency, the job files and the worker."""
