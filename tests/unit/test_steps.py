import pytest

from pipeline.steps import StepFailed, run_step


def test_failed_step_raises_with_the_end_of_its_output():
    with pytest.raises(StepFailed, match="invalid choice: 'no-such-step'"):
        run_step("no-such-step")


def test_step_without_a_result_line_is_an_error(tmp_path):
    # `--help` exits 0 but prints usage, not a JSON result.
    with pytest.raises(StepFailed, match="no JSON result line"):
        run_step("--help")
