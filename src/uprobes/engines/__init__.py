"""Engines: the ways of making a traced process report its probe hits."""
