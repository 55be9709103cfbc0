"""The HTTP layer: dependencies, error handlers and the route modules."""
