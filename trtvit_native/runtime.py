"""Running a serialized TRT-ViT engine on a CUDA GPU, with torch tensors as buffers.

    runner = EngineRunner("trt-vit-c-fp16.engine")      # or the bytes of build_engine()
    logits = runner(images)                             # (B, 3, S, S) float32 -> (B, classes)

Works with full TensorRT and with TensorRT-RTX (whichever :func:`get_backend` picks).
The engine runs on torch's current stream of the runner's device, so it orders with the
caller's other torch work. Every input is checked against the engine's optimization
profile before TensorRT sees it: a wrong batch size, channel count, image size or dtype
is an :class:`EngineError` naming the value and the accepted range.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .backend import Backend, CollectingLogger, get_backend

__all__ = ["EngineError", "EngineRunner", "check_input_shape", "exact_fp32", "GPU_TOLERANCES", "cuda_times_ms"]

# Engine logits vs the fp32 PyTorch reference on the same GPU: max|Δ| / max|ref| and cosine.
# fp32: both sides in fp32 (no TF32), with different kernels and summation orders.
GPU_TOLERANCES = {"fp32": {"rel": 1e-3, "cosine": 0.99999}, "fp16": {"rel": 2e-2, "cosine": 0.999}}


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Torch without TF32 in convolutions and matrix products (cuDNN convolutions use TF32
    by default), for an fp32 reference on the GPU."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class EngineError(RuntimeError):
    """An engine that cannot be loaded or run, or an input it does not accept."""


def cuda_times_ms(fn: Callable[[], Any], repeats: int, inner: int = 1, warmup: int = 5) -> List[float]:
    """Per-call GPU milliseconds of ``fn``: ``repeats`` samples, each the CUDA-event time of
    ``inner`` back-to-back calls on the current stream divided by ``inner``, after ``warmup``
    untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return samples


def check_input_shape(shape: Sequence[int], min_shape: Sequence[int], max_shape: Sequence[int],
                      name: str = "images") -> None:
    """Raise :class:`EngineError` unless ``shape`` lies within the profile ``[min_shape, max_shape]``.

    The message names the offending axis: batch size (with the profile's range), channels,
    or image size. No GPU is needed.
    """
    shape, lo, hi = tuple(int(v) for v in shape), tuple(int(v) for v in min_shape), tuple(int(v) for v in max_shape)
    if len(shape) != len(lo):
        raise EngineError(f"{name} must have {len(lo)} dimensions (batch, channels, height, width), got shape {shape}")
    batch = shape[0]
    if not lo[0] <= batch <= hi[0]:
        raise EngineError(f"batch size {batch} is outside the engine's profile: it accepts {lo[0]}..{hi[0]} images "
                          f"per call (rebuild with a larger max_batch, or split the batch)")
    if len(shape) == 4:
        if not lo[1] <= shape[1] <= hi[1]:
            raise EngineError(f"{name} has {shape[1]} channels; the engine takes {lo[1]}")
        if not (lo[2] <= shape[2] <= hi[2] and lo[3] <= shape[3] <= hi[3]):
            raise EngineError(f"{name} are {shape[2]}x{shape[3]}; the engine was built for {lo[2]}x{lo[3]} images")
    for axis, (v, a, b) in enumerate(zip(shape, lo, hi)):
        if not a <= v <= b:
            raise EngineError(f"{name} shape {shape}: axis {axis} is {v}, the engine accepts {a}..{b}")


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if dtype not in table:
        raise EngineError(f"engine tensor dtype {dtype} is not supported by EngineRunner")
    return table[dtype]


class EngineRunner:
    """A deserialized engine with one execution context, callable on image batches.

    ``engine`` is the serialized plan (bytes) or the path of an engine file; ``device`` a
    CUDA device (default: torch's current one). The engine must have one input and one
    output tensor (the engines of :func:`build_engine`: ``images`` and ``logits``).
    A runner holds one execution context: use one runner per thread or stream.
    """

    def __init__(self, engine: Union[bytes, bytearray, memoryview, str, Path], device: Any = None,
                 backend: Optional[str] = None):
        import torch

        if isinstance(engine, (str, Path)):
            path = Path(engine)
            if path.is_dir():
                raise EngineError(f"{path} is a directory, not an engine file")
            if not path.is_file():
                raise EngineError(f"engine file {path} does not exist")
            plan = path.read_bytes()
        else:
            plan = bytes(engine)
        if not plan:
            raise EngineError("the engine is empty (0 bytes)")
        if not torch.cuda.is_available():
            raise EngineError("running an engine needs a CUDA GPU, and torch sees none "
                              "(torch.cuda.is_available() is False); engines can still be built without one")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"device must be a CUDA device, got {self.device}")
        self.backend: Backend = get_backend(backend)
        trt = self.backend.trt
        self._logger = CollectingLogger(trt)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise EngineError(f"{self.backend.label} could not deserialize the engine ({len(plan):,d} bytes) on "
                                  f"{torch.cuda.get_device_name(self.device)}: {self._errors()}")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            if len(inputs) != 1 or not outputs:
                raise EngineError(f"EngineRunner needs an engine with one input and at least one output; this one "
                                  f"has inputs {inputs} and outputs {outputs}")
            self.input_name, self.output_name, self.output_names = inputs[0], outputs[0], outputs
            self.min_shape, self.opt_shape, self.max_shape = (
                tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
            self.output_dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in outputs}
            self.output_dtype = self.output_dtypes[self.output_name]
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EngineError(f"{self.backend.label} could not create an execution context: {self._errors()}")

    def _errors(self) -> str:
        errors = self._logger.errors()
        return " | ".join(errors) if errors else "(TensorRT reported no error message)"

    @property
    def batch_range(self) -> Tuple[int, int]:
        """Smallest and largest batch size the engine accepts."""
        return self.min_shape[0], self.max_shape[0]

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """(channels, height, width) of one input image."""
        return self.max_shape[1:]

    def describe(self) -> Dict[str, Any]:
        import torch

        return {"backend": self.backend.label, "device": torch.cuda.get_device_name(self.device),
                "input": self.input_name, "output": self.output_name, "batch_range": self.batch_range,
                "image_shape": self.image_shape, "input_dtype": str(self.input_dtype).replace("torch.", "")}

    def __call__(self, images: Any, out: Any = None) -> Any:
        """Run the engine on ``images`` (any device; moved to the runner's) and return the output,
        or ``{name: tensor}`` for an engine with several outputs (e.g. stage1..stage4).

        ``out``, when given (one-output engines), is a contiguous tensor on the runner's
        device of the output's shape and dtype that receives the result (no allocation per
        call).
        """
        import torch

        if not isinstance(images, torch.Tensor):
            raise EngineError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise EngineError(f"images must be a floating-point tensor, got {images.dtype}")
        check_input_shape(images.shape, self.min_shape, self.max_shape, self.input_name)
        x = images.to(device=self.device, dtype=self.input_dtype).contiguous()
        ctx = self.context
        with torch.cuda.device(self.device):
            if not ctx.set_input_shape(self.input_name, tuple(x.shape)):
                raise EngineError(f"TensorRT rejected input shape {tuple(x.shape)}: {self._errors()}")
            shapes = {n: tuple(int(v) for v in ctx.get_tensor_shape(n)) for n in self.output_names}
            if out is not None:
                if len(self.output_names) > 1:
                    raise EngineError("out= is for engines with one output; this one has "
                                      f"{', '.join(self.output_names)}")
                shape = shapes[self.output_name]
                if (tuple(out.shape) != shape or out.dtype != self.output_dtype or out.device != self.device
                        or not out.is_contiguous()):
                    raise EngineError(f"out must be a contiguous {self.output_dtype} tensor of shape {shape} on "
                                      f"{self.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
                results = {self.output_name: out}
            else:
                results = {n: torch.empty(shapes[n], dtype=self.output_dtypes[n], device=self.device)
                           for n in self.output_names}
            ctx.set_tensor_address(self.input_name, x.data_ptr())
            for n, t in results.items():
                ctx.set_tensor_address(n, t.data_ptr())
            self._logger.messages.clear()
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"TensorRT could not run the engine on a batch of {x.shape[0]}: {self._errors()}")
        return results[self.output_name] if len(self.output_names) == 1 else results
