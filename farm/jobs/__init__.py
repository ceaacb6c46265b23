"""The job plane: render specs and their validation, states, the durable store and
the scheduling rules. Nothing here imports Ray."""
