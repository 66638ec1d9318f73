"""The main job's guards (the full job runs on the real model in test_real_model.py)."""

from __future__ import annotations

import pytest

from routertune.demo import DemoJob, run_demo


def test_demo_refuses_a_folder_holding_another_run(tmp_path):
    (tmp_path / "router_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="did not write"):
        run_demo(DemoJob(output=str(tmp_path)), announce=lambda line: None)
    assert (tmp_path / "router_config.json").read_text() == "{}"


@pytest.mark.parametrize("field, value, message", [
    ("capacity", 1.0, "strictly between 0 and 1"),
    ("capacity", -0.1, "capacity"),
    ("limit", 0, "limit=0 must be >= 1"),
    ("tasks", ["arc_easy", "nosuchtask"], "nosuchtask"),
])
def test_demo_job_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        DemoJob(**{field: value})
