"""Shared test setup: every test runs on loopback only."""
