"""Tests of the parity engine on small models."""
