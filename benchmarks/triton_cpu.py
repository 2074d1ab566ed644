"""Latency and throughput of a repository written by export-triton, on a real Triton server
on the CPU (tritonserver 2.51 from the nvidia-pytriton wheel; tests/triton_server.py).

    python benchmarks/triton_cpu.py                       # trt-vit-a, 224x224, 8 clients x 200
    python benchmarks/triton_cpu.py --image-size 64 --pipeline-requests 5

Two measurements over loopback HTTP, each client sending one encoded photograph (scikit-image's
"coffee", 400x600 JPEG) per request, one request after the other:

* preprocessing: NAME_preprocess alone (decode, resize, crop, normalize in the Python backend);
* pipeline: the NAME_pipeline ensemble with the exported engine model on a CPU instance and
  trtvit_native.interpret on the network the engine was built from in place of the TensorRT
  runtime (tests/triton_server.py): a CPU figure, not what the engine does on a GPU.

Prints p50 and p99 latency and requests per second for each. Not a unit test: numbers
depend on the machine and on what else runs on it.

``--gpu`` serves the engine model itself (``--runner python``: EngineRunner on the GPU)
instead of the stand-in, and first prints the largest difference between the pipeline's
logits and the CPU interpreter's on the same preprocessed image (benchmarks/gpu_checks.sh).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import triton_server  # noqa: E402


def _summary(what: str, load: dict) -> str:
    import numpy as np

    lat = np.sort(np.asarray(load["latencies"]))
    n = len(lat)
    return (f"{what:<14} {n} requests, {len(load['failures'])} failed: p50 {lat[n // 2] * 1e3:.1f} ms, "
            f"p99 {lat[min(n - 1, int(n * 0.99))] * 1e3:.1f} ms, {n / load['wall']:.1f} requests/s")


def _difference(server: "triton_server.TritonServer", payload: bytes, args: argparse.Namespace,
                weights: Path) -> float:
    """max |Δ| between the served pipeline's logits and trtvit_native.interpret's."""
    import numpy as np
    import torch
    import tritonclient.http as httpclient

    import trtvit_native as tv
    from trtvit_native.data import preprocess_encoded

    built = tv.build_network(args.variant, str(weights), fp16=False, max_batch=args.max_batch,
                             image_size=args.image_size, plugins=False)
    with torch.no_grad():
        expected = tv.interpret(built, preprocess_encoded(payload, args.image_size)[None]).numpy()
    with server.http() as client:
        data = httpclient.InferInput("image_bytes", [1, 1], "BYTES")
        data.set_data_from_numpy(np.array([[payload]], dtype=object))
        got = client.infer("m_pipeline", [data]).as_numpy("logits")
    return float(np.abs(got - expected).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="trt-vit-a")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="preprocessing requests per client (200)")
    parser.add_argument("--pipeline-requests", type=int, default=10,
                        help="pipeline requests per client (10; 0 skips the pipeline)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--gpu", action="store_true",
                        help="serve the engine with EngineRunner on the GPU instead of the CPU stand-in")
    args = parser.parse_args()

    from PIL import Image
    from skimage import data

    import trtvit_native as tv
    from trtvit_native.cli import main as trtvit

    triton_server.prepare()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "w.safetensors"
        tv.save_weights(tv.create_model(args.variant), weights, args.variant)
        engine = tmp / "a.engine"
        assert trtvit(["build", args.variant, "--weights", str(weights), "--fp32", "--no-parity", "--image-size",
                       str(args.image_size), "--max-batch", str(args.max_batch), "-o", str(engine)]) == 0
        assert trtvit(["export-triton", str(engine), "--repository", str(tmp / "models"), "--name", "m",
                       "--preprocess", "--runner", "python", "--max-queue-delay-us",
                       str(args.max_queue_delay_us)]) == 0
        if not args.gpu:
            triton_server.install_stand_in(tmp / "models" / "m", engine, weights)
        buf = io.BytesIO()
        Image.fromarray(data.coffee()).save(buf, "JPEG", quality=90)
        payload = buf.getvalue()
        server = triton_server.TritonServer(tmp / "models", tmp / "run" / "server.log").start()
        try:
            with server.http() as client:
                for model in ("m_preprocess", "m", "m_pipeline"):
                    client.load_model(model)
            print(f"server         tritonserver 2.51 (nvidia-pytriton), {os.cpu_count()} CPUs; {args.variant} "
                  f"{args.image_size}x{args.image_size}, max batch {args.max_batch}, "
                  f"queue delay {args.max_queue_delay_us} us; {args.clients} HTTP clients; load average "
                  f"{os.getloadavg()[0]:.1f} before")
            if args.gpu:
                difference = _difference(server, payload, args, weights)
                print(f"logits         max|pipeline - CPU interpreter| {difference:.3g} (fp32 engine, one image)")
            triton_server.run_load(server, "m_preprocess", payload, "images", args.clients, 5)  # warm-up
            print(_summary("preprocessing", triton_server.run_load(server, "m_preprocess", payload, "images",
                                                                   args.clients, args.requests)))
            if args.pipeline_requests:
                triton_server.run_load(server, "m_pipeline", payload, "logits", 1, 1)  # warm-up
                print(_summary("pipeline", triton_server.run_load(server, "m_pipeline", payload, "logits",
                                                                  args.clients, args.pipeline_requests)))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
