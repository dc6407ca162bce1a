"""The harness itself can fail: a clean refusal passes, a success, a traceback or a changed
output folder do not."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import SMALL
from tests.reliability.harness import Result, assert_refused, refuse, run_app, snapshot


def test_config_typo_is_refused_cleanly(tmp_path):
    out = tmp_path / "run"
    refuse("infer", [f"out_dir={out}", "+batchsize=8"], "batchsize", outputs=[out])


def test_harness_rejects_success_traceback_and_leftovers(tmp_path, good_obs):
    ok = run_app("infer", f"obs_path={good_obs['obs']}", f"out_dir={tmp_path / 'ok'}", *SMALL,
                 "method=oi", "method.Lx_km=40", "method.Lt_days=4")
    assert ok.returncode == 0, ok.describe()
    with pytest.raises(AssertionError, match="expected exit 2"):
        assert_refused(ok)
    tb = Result("infer", 1, 1, "", "Traceback (most recent call last):\nValueError: x\n", ["x"])
    with pytest.raises(AssertionError):
        assert_refused(tb)
    bad = Result("infer", 1, 2, "", "oceanda infer: error: key 'x'\n", ["x"])
    assert_refused(bad, "key 'x'")
    with pytest.raises(AssertionError, match="changed by a refused run"):
        assert_refused(bad, before={tmp_path / "ok": {}})
    assert snapshot(tmp_path / "absent") is None
