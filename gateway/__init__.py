"""Serving side of lipsync-serve: the Triton launcher, and (issue 5) the REST gateway."""
