"""Settings from HSC_* variables, and the serve/worker flags that override them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hsc.core.cli import SERVE_FIELDS, WORKER_FIELDS, _settings_from, build_parser, main
from hsc.core.settings import DEMO_CHECKPOINT, Settings


def test_defaults_are_the_embedded_mode_with_the_demo_checkpoint(monkeypatch):
    for name in ("HSC_REDIS_URL", "HSC_CHECKPOINTS", "HSC_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.embedded and s.redis_url is None
    assert s.checkpoints == [str(DEMO_CHECKPOINT)]
    assert s.api_keys == [] and s.max_pixels == 50_000_000 and s.max_upload_bytes == 50 * 1024 * 1024


@pytest.mark.parametrize("raw", ["k1,k2", " k1 , k2 ,", '["k1", "k2"]'])
def test_list_variables_take_commas_or_json(monkeypatch, raw):
    monkeypatch.setenv("HSC_API_KEYS", raw)
    assert Settings().api_keys == ["k1", "k2"]


def test_a_bad_value_fails_at_start_up(monkeypatch):
    monkeypatch.setenv("HSC_PORT", "99999")
    with pytest.raises(ValidationError, match="port"):
        Settings()
    monkeypatch.setenv("HSC_PORT", "8000")
    monkeypatch.setenv("HSC_MODE", "turbo")
    with pytest.raises(ValidationError, match="mode"):
        Settings()
    monkeypatch.setenv("HSC_MODE", "fast")
    monkeypatch.setenv("HSC_WINOGRAD", "maybe")
    with pytest.raises(ValidationError, match="winograd"):
        Settings()
    monkeypatch.setenv("HSC_WINOGRAD", "off")
    assert Settings().winograd == "off"


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("HSC_PORT", "8100")
    monkeypatch.setenv("HSC_CHECKPOINTS", "/env/a.safetensors")
    args = build_parser().parse_args(["serve", "--checkpoint", "x.pth", "--checkpoint", "y.pth"])
    s = _settings_from(args, SERVE_FIELDS)
    assert s.checkpoints == ["x.pth", "y.pth"] and s.port == 8100
    args = build_parser().parse_args(["worker", "--pool", "prefork", "--concurrency", "2", "--queue", "q"])
    s = _settings_from(args, WORKER_FIELDS)
    assert (s.worker_pool, s.worker_concurrency, s.queue) == ("prefork", 2, "q")
    assert s.checkpoints == ["/env/a.safetensors"]


def test_worker_without_a_broker_says_how_to_set_one(monkeypatch, capsys):
    monkeypatch.delenv("HSC_REDIS_URL", raising=False)
    assert main(["worker"]) == 1
    assert "HSC_REDIS_URL" in capsys.readouterr().err


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"HSC_{name.upper()}" for name in Settings.model_fields if f"HSC_{name.upper()}" not in readme]
    assert not missing, f"README 'Settings' lacks {missing}"
