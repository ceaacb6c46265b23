"""The inference plane on Ray Serve: the scheduler and engine deployments.

`farm.serve:build_app` is the import path a Serve config (and KubeRay) names."""

from farm.serve.app import build_app

__all__ = ["build_app"]
