"""The training examples check the arguments they use after training before they train, so that a bad value
never costs a run."""
from __future__ import annotations

import re

import pytest

from test_examples import load_example


@pytest.mark.parametrize("name, argv, message", [
    ("class_conditioned", ["--num_inference_steps", "0"], r"--num_inference_steps must be in \[1, 1000\]"),
    ("class_conditioned", ["--samples_per_class", "0"], r"--samples_per_class >= 1"),
    ("class_conditioned", ["--guidance_scale", "nan"], r"--guidance_scale must be a finite number"),
    ("super_resolution", ["--num_test", "0"], r"--num_test >= 1"),
    ("super_resolution", ["--guidance_scales", "1", "inf"], r"--guidance_scales must be finite numbers"),
    ("text_to_image", ["--num_inference_steps", "1001"], r"--num_inference_steps must be in \[1, 1000\]"),
    ("text_to_image", ["--samples_per_prompt", "0"], r"--samples_per_prompt >= 1"),
    ("text_to_image", ["--guidance_scales", "nan"], r"--guidance_scales must be finite numbers"),
])
def test_bad_arguments_stop_before_training(name, argv, message, capsys):
    with pytest.raises(SystemExit):
        load_example(name).parse_args(argv)
    assert re.search(message, capsys.readouterr().err)
