"""Predictions made before a render runs: its cost (the timing model and its
calibration from measured samples) and its GPU memory (admission and placement)."""
