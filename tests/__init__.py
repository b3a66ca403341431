"""Tests for coder1-bridge."""
