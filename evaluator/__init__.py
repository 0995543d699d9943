"""Evaluator: checkpoint jobs from the DB → predictions back into the DB (the next issues fill it in)."""
