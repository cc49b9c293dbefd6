import json

import pytest

from gmmrefine.errors import InputError
from gmmrefine.pipeline.job import Job


def test_new_job_records_parameters_and_refuses_to_overwrite(tmp_path):
    Job(tmp_path / "job", {"seed": 3, "iterations": 5}, command_line=["gmmrefine", "refine"])
    saved = json.loads((tmp_path / "job" / "job.json").read_text())
    assert saved["params"] == {"seed": 3, "iterations": 5}
    assert saved["command_line"] == "gmmrefine refine"
    assert "torch" in saved["versions"]
    assert (tmp_path / "job" / "log.txt").read_text().count("starting job") == 1
    # Nothing computed yet (a run that failed on its input): a plain rerun starts again ...
    Job(tmp_path / "job", {"seed": 4, "iterations": 5}, command_line=[])
    assert "starting again" in (tmp_path / "job" / "log.txt").read_text()
    assert json.loads((tmp_path / "job" / "job.json").read_text())["params"]["seed"] == 4
    # ... once a step is done, the folder is refused without --continue.
    Job(tmp_path / "job", {"seed": 4, "iterations": 5}, command_line=[]).mark_done("it001/refine")
    with pytest.raises(InputError, match="--continue"):
        Job(tmp_path / "job", {"seed": 3, "iterations": 5})


def test_continue_resumes_completed_steps_and_checks_parameters(tmp_path):
    job = Job(tmp_path / "job", {"seed": 1, "lr": 1e-3}, command_line=[])
    job.mark_done("it001/reconstruct", resolution_A=7.5)
    again = Job(tmp_path / "job", {"seed": 1, "lr": 1e-3}, resume=True, command_line=[])
    assert again.is_done("it001/reconstruct")
    assert again.summary("it001/reconstruct") == {"resolution_A": 7.5}
    assert not again.is_done("it001/refine")
    assert again.seed_for("it001/refine") == job.seed_for("it001/refine")
    assert again.seed_for("it001/refine") != job.seed_for("it002/refine")
    with pytest.raises(InputError, match="lr"):
        Job(tmp_path / "job", {"seed": 1, "lr": 1e-2}, resume=True, command_line=[])


def test_continue_without_a_job_is_refused(tmp_path):
    with pytest.raises(InputError, match="job.json"):
        Job(tmp_path / "nothing", {"seed": 0}, resume=True, command_line=[])
    assert not (tmp_path / "nothing").exists()
