"""The `farm` command against the running test farm."""

from __future__ import annotations

import subprocess
import sys

from farm.client import FarmClient
from farm.postproc.encode import probe_mp4


def farm(*args: str, config_path, env_home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm", *args], capture_output=True, text=True, timeout=300,
                          env={"FARM_HOME": str(env_home), "FARM_CONFIG": str(config_path), "PATH": "/usr/bin:/bin",
                               "COLUMNS": "120"})


def test_submit_follows_progress_and_saves_the_mp4(gateway, farm_config, tmp_path):
    config, config_path = farm_config
    output = tmp_path / "boat.mp4"
    result = farm("submit", "a paper boat", "-m", "cogvideox-tiny", "--width", "160", "--height", "96",
                  "--frames", "9", "--steps", "3", "--fps", "8", "--target", gateway.target, "-o", str(output),
                  config_path=config_path, env_home=config.home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3" in result.stdout and "SUCCEEDED" in result.stdout and "DENOISING" in result.stdout
    video = probe_mp4(output.read_bytes())
    assert (video["frames"], video["width"], video["height"]) == (9, 160, 96)


def test_bad_input_exits_with_the_reason(gateway, farm_config):
    config, config_path = farm_config
    result = farm("submit", "x", "--width", "100", "--target", gateway.target, config_path=config_path,
                  env_home=config.home)
    assert result.returncode == 2
    assert "INVALID_ARGUMENT" in result.stdout and "spec.width" in result.stdout


def test_tenants_create_prints_a_working_key_once(gateway, farm_config):
    config, config_path = farm_config
    result = farm("tenants", "create", "cli-studio", config_path=config_path, env_home=config.home)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    with FarmClient(gateway.target, key) as client:
        assert client.models().models
    again = farm("tenants", "create", "cli-studio", config_path=config_path, env_home=config.home)
    assert again.returncode == 2 and "already exists" in again.stdout
    assert key not in (config.home / "farm.db").read_bytes().decode("latin-1"), "the key was stored in clear"


def test_list_and_get(gateway, farm_config, client):
    config, config_path = farm_config
    result = farm("list", "--target", gateway.target, config_path=config_path, env_home=config.home)
    assert result.returncode == 0, result.stderr
    render_id = client.list(page_size=1).renders[0].id
    assert render_id[:12] in result.stdout
    shown = farm("get", render_id, "--json", "--target", gateway.target, config_path=config_path,
                 env_home=config.home)
    assert shown.returncode == 0 and render_id in shown.stdout
