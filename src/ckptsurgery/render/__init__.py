"""Rendering for people: tables and progress bars."""
