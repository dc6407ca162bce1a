"""The console script: app listing, config composition, user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oceanda.cli import APPS, available_apps, main


def test_help_lists_available_apps(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in available_apps():
        assert f"  {name}" in out
    assert set(available_apps()) <= set(APPS)


def test_unknown_app_exits_2(capsys):
    assert main(["no-such-app"]) == 2
    assert "unknown app 'no-such-app'" in capsys.readouterr().err


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "oceanda", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip()


@pytest.fixture
def user_configs(tmp_path):
    (tmp_path / "evaluate.yaml").write_text("truth_path: ???\nanalysis: ???\nname: ${analysis}\n")
    return tmp_path


def test_config_validate_names_missing_keys(user_configs, capsys, monkeypatch):
    import oceanda.cli as cli

    monkeypatch.setattr(cli, "config_dir", lambda: user_configs)
    assert main(["config", "validate", "evaluate"]) == 2
    err = capsys.readouterr().err
    assert "truth" in err and "analysis" in err
    assert main(["config", "validate", "evaluate", "truth=a", "analysis=b"]) == 0
    assert "valid" in capsys.readouterr().out


def test_bad_override_is_a_config_error(user_configs, capsys, monkeypatch):
    import oceanda.cli as cli

    monkeypatch.setattr(cli, "config_dir", lambda: user_configs)
    assert main(["config", "show", "evaluate", "nokey"]) == 2
    assert "error" in capsys.readouterr().err


def test_log_handler_follows_swapped_stderr(capsys):
    import logging

    from oceanda.cli import setup_logging

    setup_logging("INFO")
    logging.getLogger("oceanda.test").info("first message")
    assert "first message" in capsys.readouterr().err
    logging.getLogger("oceanda.test").info("second message")
    assert "second message" in capsys.readouterr().err


def test_path_aliases_do_not_clash_with_generate_groups():
    """``obs``/``truth`` are config groups of generate; infer/evaluate take them as paths."""
    from oceanda.cli import apply_aliases, compose

    assert apply_aliases("infer", ["obs=a.zarr", "truth=b.zarr", "method=oi"]) == [
        "obs_path=a.zarr", "truth_path=b.zarr", "method=oi"]
    assert apply_aliases("generate", ["obs=4nadirs"]) == ["obs=4nadirs"]
    cfg = compose("evaluate", ["truth=t.zarr", "analysis=a.zarr"])
    assert cfg.truth_path == "t.zarr" and cfg.analysis == "a.zarr"
    cfg = compose("infer", ["obs=o.zarr", "truth=t.zarr"])
    assert cfg.obs_path == "o.zarr" and cfg.truth_path == "t.zarr"
    cfg = compose("generate", ["obs=4nadirs_swot"])
    assert "swot" in str(cfg.obs).lower()
