"""What a person runs: the `farm` commands, their progress bars, the embedded farm,
the demo, and the client SDK other programs use."""
