"""Engines executed by TensorRT on a GPU against the PyTorch reference on the same GPU.

``pytest -m gpu``; skipped, with the reason, without a CUDA GPU, without a TensorRT
module, or where TensorRT cannot load its own engine on this device (deserialization or
execution context), with TensorRT's message as the reason. The engines are built exactly as on CPU (TensorRT-RTX where full
TensorRT is absent), so this also shows whether those engines run on the device at hand.
"""

import pytest
import torch

import trtvit_native as tv
from trtvit_native.runtime import GPU_TOLERANCES, exact_fp32
from conftest import cosine, engine_backend_or_skip, photographs, random_images, reference, runner_or_skip

pytestmark = pytest.mark.gpu

BACKEND = engine_backend_or_skip()

DEV = torch.device("cuda")


def _images(batch):
    """Photographs where scikit-image is installed, else the package's synthetic images."""
    try:
        return photographs(batch)
    except ImportError:
        return tv.synthetic_images(batch, seed=5)


KINDS = [(False, "matmul"), (True, "matmul")]
if BACKEND.has_attention_layer:
    KINDS += [(False, "fused"), (True, "fused")]


@pytest.fixture(scope="module", params=KINDS, ids=[f"{'fp16' if h else 'fp32'}-{a}" for h, a in KINDS])
def engine(request):
    fp16, attention = request.param
    plan = tv.build_engine("trt-vit-a", reference("trt-vit-a").state_dict(), fp16=fp16, max_batch=4,
                           attention=attention)
    return fp16, runner_or_skip(plan)


def test_engine_matches_the_reference_on_the_gpu(engine):
    fp16, runner = engine
    model = reference("trt-vit-a").to(DEV)
    try:
        for images in (_images(3), _images(1), random_images(4, seed=1)):
            images = images.to(DEV)
            with torch.no_grad(), exact_fp32():
                ref = model(images)
            out = runner(images)
            torch.cuda.synchronize()
            assert out.shape == ref.shape and out.dtype == torch.float32 and out.device.type == "cuda"
            err = (out - ref).abs().max().item() / ref.abs().max().item()
            tol = GPU_TOLERANCES["fp16" if fp16 else "fp32"]
            assert err <= tol["rel"] and cosine(out, ref) >= tol["cosine"], err
    finally:
        model.cpu()


def test_engine_accepts_cpu_tensors_and_an_output_buffer(engine):
    _, runner = engine
    images = _images(2)
    first = runner(images)  # host memory in, host memory out
    assert first.device.type == "cpu"
    out = torch.empty(first.shape, device=DEV)
    assert runner(images.to(DEV), out=out) is out
    torch.cuda.synchronize()
    assert torch.equal(first, out.cpu())


def test_engine_rejects_a_batch_beyond_its_profile(engine):
    _, runner = engine
    assert runner.batch_range == (1, 4)
    with pytest.raises(tv.EngineError, match="batch size 5 is outside the engine's profile: it accepts 1..4"):
        runner(random_images(5))


def test_cli_builds_and_runs_an_engine_file(tmp_path, capsys):
    from trtvit_native.cli import main

    target = tmp_path / "a.engine"
    assert main(["build", "trt-vit-a", "--max-batch", "4", "--no-parity", "-o", str(target)]) == 0
    capsys.readouterr()
    assert main(["run", str(target), "--batch", "1", "--batch", "4", "--iterations", "5"]) == 0
    out = capsys.readouterr().out
    assert "(trt-vit-a, fp16, matmul attention): batch 1..4" in out
    assert "batch    1:" in out and "batch    4:" in out and "images/s" in out
    assert main(["run", str(target), "--batch", "5"]) == 1
    assert "batch size 5 is outside the engine's profile" in capsys.readouterr().err


def test_cli_check_compares_the_engine_file_with_the_reference(tmp_path, capsys):
    from trtvit_native.cli import main

    target = tmp_path / "a32.engine"
    assert main(["build", "trt-vit-a", "--fp32", "--max-batch", "2", "--no-parity", "-o", str(target)]) == 0
    capsys.readouterr()
    assert main(["run", str(target), "--iterations", "2", "--check"]) == 0
    assert "PASS" in capsys.readouterr().out
