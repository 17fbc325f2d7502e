"""Deterministic names of what the operator creates."""

from __future__ import annotations


def revision_name(cr_name: str, rev_hash: str) -> str:
    """The revision's name, also its Deployment's name (CR names are at most 52 characters)."""
    return f"{cr_name}-{rev_hash}"
