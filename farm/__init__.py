"""farm: a render farm for AI video generation."""

__version__ = "0.1.0"
