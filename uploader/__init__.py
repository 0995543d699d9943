"""Uploader: work_dir files → parsed records → state DB → W&B (see DESIGN.md for the invariants)."""
