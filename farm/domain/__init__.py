"""The vocabulary every room shares: render specs, states and stages, engine
requests and the typed events of a render's stream, checkpoints, and errors.
Imports nothing of farm but itself."""
