"""One module per group of routes; :mod:`gateway.api.main` puts them together."""
