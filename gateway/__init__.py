"""Serving side of lipsync-serve: the Triton launcher and the REST gateway."""
