"""Codec tests: golden cases, round trips against encoders written from the SPEC, edge cases."""
