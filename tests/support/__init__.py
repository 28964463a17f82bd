"""Test-only stand-ins and fixtures (never imported by product code)."""
