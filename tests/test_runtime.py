"""EngineRunner's checks that need no GPU: input shapes against the profile, bad engines."""

import pytest
import torch

from trtvit_native.runtime import EngineError, EngineRunner, check_input_shape

MIN, MAX = (1, 3, 224, 224), (32, 3, 224, 224)


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (7, 3, 224, 224), (32, 3, 224, 224)])
def test_shapes_inside_the_profile_pass(shape):
    check_input_shape(shape, MIN, MAX)


@pytest.mark.parametrize("shape, message", [
    ((33, 3, 224, 224), r"batch size 33 is outside the engine's profile: it accepts 1\.\.32 images"),
    ((0, 3, 224, 224), r"batch size 0 is outside"),
    ((2, 1, 224, 224), r"images has 1 channels; the engine takes 3"),
    ((2, 3, 256, 256), r"images are 256x256; the engine was built for 224x224 images"),
    ((2, 3, 224, 192), r"images are 224x192"),
    ((3, 224, 224), r"images must have 4 dimensions \(batch, channels, height, width\), got shape \(3, 224, 224\)"),
])
def test_shapes_outside_the_profile_name_the_axis(shape, message):
    with pytest.raises(EngineError, match=message):
        check_input_shape(shape, MIN, MAX)


def test_missing_and_empty_engines_are_named(tmp_path):
    with pytest.raises(EngineError, match="engine file .*nothing.engine does not exist"):
        EngineRunner(tmp_path / "nothing.engine")
    with pytest.raises(EngineError, match=r"the engine is empty \(0 bytes\)"):
        EngineRunner(b"")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where there is no GPU")
def test_without_a_gpu_the_error_says_so():
    with pytest.raises(EngineError, match="running an engine needs a CUDA GPU"):
        EngineRunner(b"\x00" * 16)
