"""Helpers shared by the tests (not tests themselves): the step driver against the NumPy reference."""
