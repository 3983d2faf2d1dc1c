"""Composable interventions: steering, ablation, routing edits, expert steering, patching."""

from .base import Compose, Intervention, attach_all, intervene

__all__ = ["Intervention", "Compose", "intervene", "attach_all"]
