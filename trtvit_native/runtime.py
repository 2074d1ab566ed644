"""Running a serialized TRT-ViT engine on a CUDA GPU with TensorRT, cuda.core and numpy.

    runner = EngineRunner("trt-vit-c-fp16.engine")      # or the bytes of build_engine()
    logits = runner(images)                             # (B, 3, S, S) -> (B, classes)

``images`` may be a numpy array (host memory: copied through pinned buffers on the
runner's stream), a CuPy array, a torch tensor, or any object with
``__cuda_array_interface__`` or DLPack (device memory: used in place, no copy); the outputs
come back as the same kind (numpy in, numpy out; CuPy in, CuPy out; see
:mod:`trtvit_native.arrays`). Nothing here imports torch: ``pip install
"trtvit_native[runtime-cu13]"`` (or ``runtime-cu12`` for a CUDA 12 driver) and TensorRT
are all it needs.

Streams: by default the runner has its own stream; a call returns complete host results,
and device results ordered for their consumers without blocking the host (a DeviceArray
names the runner's stream in its ``__cuda_array_interface__``, torch's or CuPy's current
stream waits for an event; the host waits only for an ``out=`` of another kind). Given a stream (``EngineRunner(..., stream=s)`` or ``runner(x, stream=s)``: a
cuda.core, cuda-python, CuPy or torch stream, or a raw handle), the work is queued on it
and the call returns at once for device arrays (host arrays are still waited for: numpy
results must be complete); a :class:`~trtvit_native.arrays.DeviceArray` result then names
that stream in its ``__cuda_array_interface__``. In that mode the inputs and ``out`` must
stay valid until the stream reaches the call. Device inputs and ``out`` are first ordered
after the streams that produced them. The runner's one execution context is ordered across
streams: a call on another stream than the previous one waits for an event recorded after
the previous call's work (TensorRT forbids concurrent use of one context).

Every input is checked before TensorRT sees it: a wrong kind, dtype, layout, batch size,
channel count or image size, or host memory where device memory is needed, is an
:class:`EngineError` naming the array, the value and what the engine accepts. Works with
full TensorRT and with TensorRT-RTX (whichever :func:`get_backend` picks).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import arrays
from .arrays import ArrayError, ArrayView, CudaError, CudaUnavailable
from .backend import Backend, CollectingLogger, get_backend

__all__ = ["EngineError", "EngineRunner", "EngineIO", "check_input_shape", "exact_fp32", "GPU_TOLERANCES", "QUANTIZED_GPU_CHECK",
           "cuda_times_ms"]

# Engine logits vs the fp32 PyTorch reference on the same GPU: max|Δ| / max|ref| and cosine.
# fp32: both sides in fp32 (no TF32), with different kernels and summation orders.
GPU_TOLERANCES = {"fp32": {"rel": 1e-3, "cosine": 0.99999}, "fp16": {"rel": 2e-2, "cosine": 0.999}}
# ``trtvit run --check`` of a quantized engine against the fake-quantized reference: the
# CPU interpreter's int8/fp8 networks agree with it at cosine >= 0.9999999 (README
# "Quantize to INT8 or FP8"); a GPU's kernels flip codes at rounding boundaries and
# accumulate in other orders, so the check asks for cosine 0.995 and 90 % top-1 agreement.
QUANTIZED_GPU_CHECK = {"cosine": 0.995, "top1": 0.9}


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



def cuda_times_ms(fn: Callable[[], Any], repeats: int, inner: int = 1, warmup: int = 5,
                  stream: Any = arrays.LEGACY_STREAM) -> List[float]:
    """Per-call GPU milliseconds of ``fn``: ``repeats`` samples, each the CUDA-event time on
    ``stream`` of ``inner`` back-to-back calls divided by ``inner``, after ``warmup`` untimed
    calls. ``fn`` must queue its work on ``stream`` (an :class:`EngineRunner`'s ``stream``)."""
    s = arrays.as_stream(stream)
    timing = arrays.core().EventOptions(timing_enabled=True)
    for _ in range(warmup):
        fn()
    s.sync()
    samples = []
    for _ in range(repeats):
        start = s.record(options=timing)
        for _ in range(inner):
            fn()
        end = s.record(options=timing)
        end.sync()
        samples.append(float(end - start) / inner)
    return samples


_NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT8": np.int8, "BOOL": np.bool_,
                 "INT64": np.int64, "UINT8": np.uint8}


def _numpy_dtype(trt_dtype: Any) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).upper()
    if name not in _NUMPY_DTYPES:
        raise EngineError(f"engine tensor dtype {name} is not supported by EngineRunner")
    return np.dtype(_NUMPY_DTYPES[name])


@dataclass(frozen=True)
class EngineIO:
    """An engine's input contract: tensor names and dtypes, and the input's profile range.

    The runner's checks of its arguments live here and need neither a GPU nor the engine:
    :meth:`from_metadata` gives the same contract from ENGINE.json.
    """

    input_name: str
    input_dtype: np.dtype
    min_shape: Tuple[int, ...]
    opt_shape: Tuple[int, ...]
    max_shape: Tuple[int, ...]
    output_names: Tuple[str, ...]
    output_dtypes: Tuple[np.dtype, ...]

    @classmethod
    def from_engine(cls, trt: Any, engine: Any) -> "EngineIO":
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise EngineError(f"EngineRunner needs an engine with one input and at least one output; this one has "
                              f"inputs {inputs} and outputs {outputs}")
        lo, opt, hi = (tuple(int(v) for v in s) for s in engine.get_tensor_profile_shape(inputs[0], 0))
        return cls(inputs[0], _numpy_dtype(engine.get_tensor_dtype(inputs[0])), lo, opt, hi, tuple(outputs),
                   tuple(_numpy_dtype(engine.get_tensor_dtype(n)) for n in outputs))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "EngineIO":
        """The contract ENGINE.json (``trtvit build``'s metadata) describes."""
        try:
            inp, batch, size = meta["input"], meta["batch"], meta["image_size"]
            channels = int(inp["shape"][1])
            shapes = [(int(batch[k]), channels, *(int(v) for v in size[k])) for k in ("min", "opt", "max")]
            return cls(inp["name"], np.dtype(inp["dtype"]), *shapes,
                       tuple(o["name"] for o in meta["outputs"]), tuple(np.dtype(o["dtype"]) for o in meta["outputs"]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise EngineError(f"engine metadata lacks the input contract ({type(e).__name__}: {e})") from None

    def check_images(self, view: ArrayView) -> None:
        """Dtype, layout and shape of the input; no CUDA call."""
        name = view.name
        if view.on_device:
            if view.dtype != self.input_dtype:
                raise EngineError(f"{name} is {view.describe()}; the engine takes {self.input_dtype.name} (device "
                                  f"arrays are used in place, not converted: convert it first)")
            if not view.contiguous:
                raise EngineError(f"{name} in device memory must be C-contiguous (it is a strided view); make a "
                                  f"contiguous copy first")
        elif view.dtype.kind != "f":
            raise EngineError(f"{name} must hold floating-point pixels (normalized images), got {view.dtype.name}")
        check_input_shape(view.shape, self.min_shape, self.max_shape, name)

    def check_out(self, images: ArrayView, out: ArrayView, shape: Optional[Tuple[int, ...]] = None) -> None:
        """An ``out=`` buffer: in the same place as the images, with the output's dtype and,
        when known, shape."""
        if len(self.output_names) != 1:
            raise EngineError(f"out= is for engines with one output; this one has {', '.join(self.output_names)}")
        if images.on_device and not out.on_device:
            raise EngineError(f"out is host memory ({out.kind}) but images are in device memory: the engine "
                              f"writes its output in place, so out must be device memory too")
        if out.on_device and not images.on_device:
            raise EngineError(f"out is device memory but images are host memory ({images.kind}); pass a numpy "
                              f"out, or images in device memory")
        if out.readonly:
            raise EngineError(f"out is read-only ({out.kind}, as its producer exports it); pass a writable array")
        dtype = self.output_dtypes[0]
        if out.dtype != dtype or not out.contiguous or (shape is not None and out.shape != tuple(shape)):
            want = f"shape {tuple(shape)}" if shape is not None else "the output's shape"
            raise EngineError(f"out must be a C-contiguous {dtype.name} array of {want}, got {out.describe()}"
                              + ("" if out.contiguous else " (strided)"))

    def check_call(self, images: Any, out: Any = None, stream: Optional[int] = None
                   ) -> Tuple[ArrayView, Optional[ArrayView]]:
        """Views of ``images`` and ``out`` after every check that needs no GPU."""
        try:
            view = arrays.view_array(images, self.input_name, stream)
            out_view = None if out is None else arrays.view_array(out, "out", stream)
        except ArrayError as e:
            raise EngineError(str(e)) from None
        self.check_images(view)
        if out_view is not None:
            self.check_out(view, out_view)
        return view, out_view


def _read_plan(engine: Union[bytes, bytearray, memoryview, str, Path]) -> bytes:
    if isinstance(engine, (str, Path)):
        path = Path(engine)
        if path.is_dir():
            raise EngineError(f"{path} is a directory, not an engine file")
        if not path.is_file():
            raise EngineError(f"engine file {path} does not exist")
        from .weights import not_an_engine

        other = not_an_engine(path)
        if other is not None:
            raise EngineError(other)
        plan = path.read_bytes()
    elif isinstance(engine, (bytes, bytearray, memoryview)):
        plan = bytes(engine)
    else:
        raise EngineError(f"engine must be the serialized plan (bytes) or an engine file path, got "
                          f"{type(engine).__name__}")
    if not plan:
        raise EngineError("the engine is empty (0 bytes)")
    return plan


def _device_ordinal(device: Any) -> Optional[int]:
    """None, an int, "cuda", "cuda:N", or a torch.device -> an ordinal (None: the current one)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    text = str(device)
    if text == "cuda":
        return None
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise EngineError(f"device must be a CUDA device (an ordinal, 'cuda' or 'cuda:N'), got {device!r}")


@contextlib.contextmanager
def _cuda_errors(what: str) -> Iterator[None]:
    """CUDA failures (prefixed with ``what``) and refused arrays or streams as EngineError."""
    try:
        with arrays.cuda_errors():
            yield
    except CudaError as e:
        raise EngineError(f"{what}: {e}") from None
    except ArrayError as e:
        raise EngineError(str(e)) from None


class EngineRunner:
    """A deserialized engine with one execution context, callable on image batches.

    ``engine`` is the serialized plan (bytes) or the path of an engine file; ``device`` a
    CUDA device ordinal (or "cuda:N"; default: the current device); ``stream`` the stream
    to queue work on (default: the runner's own). The engine must have one input and at
    least one output (the engines of :func:`build_engine`: ``images`` and ``logits``, or
    the feature maps). A runner holds one execution context and one set of staging
    buffers: use one runner per thread. Calls on different streams are ordered one after
    the other (an event recorded after each call's work).
    """

    def __init__(self, engine: Union[bytes, bytearray, memoryview, str, Path], device: Any = None,
                 backend: Optional[str] = None, stream: Any = None):
        plan = _read_plan(engine)
        try:
            reason = arrays.no_device_reason()
        except CudaUnavailable as e:
            raise EngineError(f"running an engine needs a CUDA GPU: {e}") from None
        if reason is not None:
            raise EngineError(f"running an engine needs a CUDA GPU, and CUDA sees none ({reason}); engines can "
                              f"still be built without one")
        ordinal = _device_ordinal(device)
        self._closed = False
        self._checked_stream: Optional[int] = None  # the last stream found to be of the runner's context
        self._own_stream: Any = None
        self._staging: Dict[str, Any] = {}
        self._last: Any = None  # event after the last call's work, and its stream handle
        self._last_stream: Optional[int] = None
        self._handed_over: "weakref.WeakSet[arrays.DeviceArray]" = weakref.WeakSet()  # naming the own stream
        with _cuda_errors("setting up the runner"):
            given_stream = None if stream is None else arrays.stream_handle(stream)
            count = arrays.device_count()
            if ordinal is not None and ordinal >= count:
                raise EngineError(f"device cuda:{ordinal} does not exist: CUDA sees {count} device(s), "
                                  f"cuda:0..cuda:{count - 1}")
            self.device: int = int(arrays.device(ordinal).device_id)
            self.backend: Backend = get_backend(backend)
            trt = self.backend.trt
            self._logger = CollectingLogger(trt)
            with arrays.device_scope(self.device):
                self.device_name = arrays.device_name(self.device)
                self._runtime = trt.Runtime(self._logger)
                self.engine = self._runtime.deserialize_cuda_engine(plan)
                if self.engine is None:
                    raise EngineError(f"{self.backend.label} could not deserialize the engine ({len(plan):,d} bytes) "
                                      f"on {self.device_name}: {self._errors()}")
                self.io = EngineIO.from_engine(trt, self.engine)
                self.context = self.engine.create_execution_context()
                if self.context is None:
                    raise EngineError(f"{self.backend.label} could not create an execution context: "
                                      f"{self._errors()}")
                if given_stream is None:
                    self._own_stream = arrays.create_stream(self.device)
                    self.stream: int = arrays.stream_handle(self._own_stream)
                else:
                    foreign = arrays.foreign_stream_context(given_stream, self.device)
                    if foreign is not None:
                        raise EngineError(foreign)
                    self.stream = given_stream

    # The contract, under the names callers use.
    input_name = property(lambda self: self.io.input_name)
    output_names = property(lambda self: list(self.io.output_names))
    output_name = property(lambda self: self.io.output_names[0])
    input_dtype = property(lambda self: self.io.input_dtype)
    min_shape = property(lambda self: self.io.min_shape)
    opt_shape = property(lambda self: self.io.opt_shape)
    max_shape = property(lambda self: self.io.max_shape)

    def _errors(self) -> str:
        errors = self._logger.errors()
        return " | ".join(errors) if errors else "(TensorRT reported no error message)"

    @property
    def batch_range(self) -> Tuple[int, int]:
        """Smallest and largest batch size the engine accepts."""
        return self.min_shape[0], self.max_shape[0]

    @property
    def image_shape(self) -> Tuple[int, ...]:
        """(channels, height, width) of one input image (the largest, for a dynamic size)."""
        return self.max_shape[1:]

    def describe(self) -> Dict[str, Any]:
        return {"backend": self.backend.label, "device": self.device_name, "input": self.input_name,
                "outputs": self.output_names, "batch_range": self.batch_range, "image_shape": self.image_shape,
                "input_dtype": self.input_dtype.name, "stream": "own" if self._own_stream is not None else "caller's"}

    def close(self) -> None:
        """Release the runner's own stream and staging buffers (also done when it is collected,
        and at the end of ``with EngineRunner(...) as runner:``); the runner cannot run after.
        It works in the runner's device context, whatever the calling thread's is."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            with arrays.device_scope(self.device):
                if self._last is not None:
                    self._last.sync()  # nothing of this runner's is still queued when its memory goes
                self._last = None
                for a in list(self._handed_over):
                    a.written_on(None)  # complete, and the stream they named goes
                for pinned, device in self._staging.values():
                    pinned.close(self.stream)
                    device.free()
                self._staging.clear()
                if self._own_stream is not None:
                    arrays.destroy_stream(self._own_stream)
                    self._own_stream = None
                # TensorRT's objects go here, in the runner's context, not whenever and wherever
                # the collector gets to them: the execution context, then the engine, then the runtime.
                for name in ("context", "engine", "_runtime"):
                    if hasattr(self, name):
                        delattr(self, name)
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> "EngineRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _set_shape(self, shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
        if not self.context.set_input_shape(self.input_name, tuple(shape)):
            raise EngineError(f"TensorRT rejected input shape {tuple(shape)}: {self._errors()}")
        return {n: tuple(int(v) for v in self.context.get_tensor_shape(n)) for n in self.output_names}

    def _bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise EngineError(f"TensorRT refused the address of {name} ({ptr:#x}): {self._errors()}")

    def _order_after_last_call(self, stream: int) -> None:
        """One context, and one set of staging buffers, never on two streams at once: a call
        on another stream than the previous call's waits for that call's event."""
        if self._last is not None and self._last_stream != stream:
            arrays.as_stream(stream).wait(self._last)

    def _execute(self, stream: int, batch: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"TensorRT could not run the engine on a batch of {batch}: {self._errors()}")

    def _finish(self, stream: int) -> None:
        """(Re-)record the runner's one event after this call's work. It is a blocking-sync
        event: a host that waits for it sleeps instead of spinning a core (which the CPU
        preprocessing beside a server's runners needs)."""
        options = None if self._last is not None else arrays.core().EventOptions(blocking_sync=True)
        self._last, self._last_stream = arrays.as_stream(stream).record(self._last, options=options), stream

    def _hand_over(self, results: Any, stream: int) -> None:
        """Order the consumers of device results after the call's work. A DeviceArray names
        ``stream``; in own-stream mode torch's or CuPy's current stream waits for the event
        (the host does not), and the host waits only for an ``out=`` of another kind."""
        own = self._own_stream is not None and stream == self.stream
        for obj in results:
            if isinstance(obj, arrays.DeviceArray):
                obj.written_on(stream)
                if own:
                    self._handed_over.add(obj)
            elif own:
                consumer = arrays.consumer_stream(obj)
                if consumer is None:
                    self._last.sync()
                elif consumer != stream:
                    arrays.as_stream(consumer).wait(self._last)

    def host_input(self, shape: Sequence[int]) -> np.ndarray:
        """The runner's pinned input buffer as an array of ``shape`` (within the profile):
        write a batch into it and pass it as ``images``, and the call makes no host copy
        of it (it goes to the GPU from there). Valid until the next call."""
        shape = tuple(int(v) for v in shape)
        if getattr(self, "_closed", True):
            raise EngineError("the runner is closed")
        check_input_shape(shape, self.min_shape, self.max_shape, self.input_name)
        with _cuda_errors(f"staging on {self.device_name}"), arrays.device_scope(self.device):
            return self._staging_buffers()[self.input_name][0].view(shape, self.input_dtype)

    def __call__(self, images: Any, out: Any = None, stream: Any = None, host_views: bool = False) -> Any:
        """Run the engine on ``images`` and return the output, or ``{name: array}`` for an
        engine with several outputs (e.g. stage1..stage4), of the kind ``images`` is.

        ``out`` (one-output engines) receives the result instead of a new array: device
        memory for device images, a numpy array for host images; C-contiguous, of the
        output's shape and dtype. ``stream`` overrides the runner's stream for this call.
        ``host_views`` (host images): the results are numpy views of the runner's pinned
        output buffers, valid until the next call, instead of copies (for a caller that
        copies them on anyway, as a server's response does).
        """
        if getattr(self, "_closed", True):
            raise EngineError("the runner is closed")
        self._logger.messages.clear()
        with _cuda_errors(f"running the engine on {self.device_name}"):
            run_stream = self.stream if stream is None else arrays.stream_handle(stream)
            for name, x in ((self.input_name, images), ("out", out)):
                where = None if x is None else arrays.array_device(x)
                if where is not None and where != self.device:
                    raise EngineError(f"{name} is on cuda:{where}, the runner on cuda:{self.device}")
            # Views are made in the runner's context: ordering the run stream after a producer
            # records an event, which CUDA allows only in the stream's own context.
            with arrays.device_scope(self.device):
                if run_stream != self._checked_stream:
                    foreign = arrays.foreign_stream_context(run_stream, self.device)
                    if foreign is not None:
                        raise EngineError(foreign)
                    self._checked_stream = run_stream
                view, out_view = self.io.check_call(images, out, run_stream)
                self._queued = False
                try:
                    if view.on_device:
                        results = self._run_device(view, out_view, run_stream)
                    else:
                        results = self._run_host(view, out_view, run_stream, host_views)
                except BaseException:
                    if self._queued:
                        self._settle(run_stream)
                    raise
        return results[self.output_name] if len(self.output_names) == 1 else results

    def _settle(self, stream: int) -> None:
        """After a call failed part-way: wait for what it queued (copies that still read the
        staging buffers), so that the next call may rewrite them."""
        try:
            arrays.as_stream(stream).sync()
        except Exception:  # the failure itself was CUDA's: nothing more to wait for
            pass

    def _run_device(self, view: ArrayView, out_view: Optional[ArrayView], stream: int) -> Dict[str, Any]:
        if view.device != self.device:
            raise EngineError(f"{view.name} is on cuda:{view.device}, the runner on cuda:{self.device}")
        shapes = self._set_shape(view.shape)
        if out_view is not None:
            self.io.check_out(view, out_view, shapes[self.output_name])
            if out_view.device != self.device:
                raise EngineError(f"out is on cuda:{out_view.device}, the runner on cuda:{self.device}")
            buffers = {self.output_name: (out_view.keep, out_view.ptr)}
        else:
            buffers = {n: arrays.empty_device(view.kind, shapes[n], d, self.device, stream)
                       for n, d in zip(self.output_names, self.io.output_dtypes)}
        for v in (view, out_view):
            if v is not None and v.kind == "torch":
                arrays.record_torch_stream(v.keep, stream)
        self._bind(self.input_name, view.ptr)
        for n, (_, ptr) in buffers.items():
            self._bind(n, ptr)
        self._order_after_last_call(stream)
        self._execute(stream, view.shape[0])
        self._finish(stream)
        self._hand_over([obj for obj, _ in buffers.values()], stream)
        return {n: obj for n, (obj, _) in buffers.items()}

    def _staging_buffers(self) -> Dict[str, Any]:
        """Pinned host and device buffers for the profile's largest input and outputs, made once."""
        if not self._staging:
            shapes = self._set_shape(self.max_shape)
            specs = [(self.input_name, self.max_shape, self.input_dtype)] + [
                (n, shapes[n], d) for n, d in zip(self.output_names, self.io.output_dtypes)]
            for name, shape, dtype in specs:
                nbytes = int(np.prod(shape)) * dtype.itemsize
                self._staging[name] = (arrays.PinnedBuffer(nbytes), arrays.DeviceArray((nbytes,), np.uint8,
                                                                                       self.device, self.stream))
            # The pool orders an allocation on its stream only; calls may come on other streams.
            arrays.as_stream(self.stream).sync()
            for _, device in self._staging.values():
                device.written_on(None)
        return self._staging

    def _run_host(self, view: ArrayView, out_view: Optional[ArrayView], stream: int,
                  host_views: bool = False) -> Dict[str, Any]:
        staging = self._staging_buffers()
        shapes = self._set_shape(view.shape)
        if out_view is not None:
            self.io.check_out(view, out_view, shapes[self.output_name])
        pinned, device = staging[self.input_name]  # free: every host call waits for its copies
        staged = pinned.view(view.shape, self.input_dtype)
        if not (view.host.ctypes.data == pinned.ptr and view.host.dtype == self.input_dtype
                and view.host.flags.c_contiguous):
            staged[...] = view.host  # converts the dtype while copying; host_input() arrays are there already
        nbytes = int(np.prod(view.shape)) * self.input_dtype.itemsize
        s = arrays.as_stream(stream)
        self._order_after_last_call(stream)
        self._queued = True
        arrays.copy_async(device.ptr, pinned.ptr, nbytes, s)
        self._bind(self.input_name, device.ptr)
        for n in self.output_names:
            self._bind(n, staging[n][1].ptr)
        self._execute(stream, view.shape[0])
        for n, dtype in zip(self.output_names, self.io.output_dtypes):
            pinned_out, device_out = staging[n]
            arrays.copy_async(pinned_out.ptr, device_out.ptr, int(np.prod(shapes[n])) * dtype.itemsize, s)
        self._finish(stream)
        self._last.sync()
        results = {}
        for n, dtype in zip(self.output_names, self.io.output_dtypes):
            host = staging[n][0].view(shapes[n], dtype)
            if out_view is not None:
                out_view.host[...] = host
                results[n] = out_view.keep
            else:
                results[n] = arrays.host_result(view.kind, host if host_views else host.copy())
        return results
