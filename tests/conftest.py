"""Shared pytest setup: make tests/ helpers importable and keep preset caches inside the test session."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
