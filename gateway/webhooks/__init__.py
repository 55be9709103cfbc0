"""Telling clients that their jobs finished: target checks, signing and the durable delivery."""
