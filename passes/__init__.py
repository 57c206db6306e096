"""Bundled fxpeft rule files (package data)."""
