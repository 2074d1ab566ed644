"""Latency and throughput of a repository written by export-triton, on a real Triton server
on the CPU (tritonserver 2.51 from the nvidia-pytriton wheel; tests/triton_server.py).

    python benchmarks/triton_cpu.py          # trt-vit-a 32x32, 8 clients x 200, as the load test
    python benchmarks/triton_cpu.py --image-size 224 --photo-size 600x400 --pipeline-requests 0

Two measurements over loopback HTTP, 8 clients each sending its own photograph from
scikit-image (JPEG, 60x44 by default: tests/triton_server.py's load_payloads) one request
after the other, each response checked against the CPU interpreter's result:

* preprocessing: NAME_preprocess alone (decode, resize, crop, normalize in the Python backend);
* pipeline: the NAME_pipeline ensemble with the exported engine model on a CPU instance and
  trtvit_native.interpret on the network the engine was built from in place of the TensorRT
  runtime (tests/triton_server.py): a CPU figure, not what the engine does on a GPU. The
  defaults (32x32, batches of up to 8, 30 ms queue delay, 8 x 200 requests) are the load
  test's (tests/test_triton.py).

Prints p50 and p99 latency and requests per second for each. Not a unit test: numbers
depend on the machine and on what else runs on it.

``--gpu`` serves the engine model itself (``--runner python``: EngineRunner on the GPU)
instead of the stand-in, and first prints the largest difference between the pipeline's
logits and the CPU interpreter's on the same preprocessed image (benchmarks/gpu_checks.sh).
"""

from __future__ import annotations

import argparse
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
    return (f"{what:<14} {n} requests, {len(load['failures'])} failed or wrong "
            f"(max|Δ| {load['max_difference']:.2g}): p50 {lat[n // 2] * 1e3:.1f} ms, "
            f"p99 {lat[min(n - 1, int(n * 0.99))] * 1e3:.1f} ms, {n / load['wall']:.1f} requests/s")


def _difference(server: "triton_server.TritonServer", payload: bytes, expected) -> float:
    """max |Δ| between the served pipeline's logits for ``payload`` and ``expected``
    (trtvit_native.interpret's)."""
    import numpy as np
    import tritonclient.http as httpclient

    with server.http() as client:
        data = httpclient.InferInput("image_bytes", [1, 1], "BYTES")
        data.set_data_from_numpy(np.array([[payload]], dtype=object))
        got = client.infer("m_pipeline", [data]).as_numpy("logits")
    return float(np.abs(got[0] - expected).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="trt-vit-a")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="preprocessing requests per client (200)")
    parser.add_argument("--pipeline-requests", type=int, default=200,
                        help="pipeline requests per client (200; 0 skips the pipeline)")
    parser.add_argument("--photo-size", default="60x44", help="WIDTHxHEIGHT of the JPEGs sent (60x44)")
    parser.add_argument("--max-queue-delay-us", type=int, default=30000)
    parser.add_argument("--gpu", action="store_true",
                        help="serve the engine with EngineRunner on the GPU instead of the CPU stand-in")
    args = parser.parse_args()

    import torch

    import trtvit_native as tv
    from trtvit_native.cli import main as trtvit
    from trtvit_native.data import preprocess_encoded

    width, _, height = args.photo_size.partition("x")
    payloads = triton_server.load_payloads((int(width), int(height)))

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
        images = torch.stack([preprocess_encoded(p, args.image_size) for p in payloads])
        built = tv.build_network(args.variant, str(weights), fp16=False, max_batch=args.max_batch,
                                 image_size=args.image_size, plugins=False)
        with torch.no_grad():
            logits = torch.cat([tv.interpret(built, images[i:i + args.max_batch])
                                for i in range(0, len(images), args.max_batch)]).numpy()
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
                difference = _difference(server, payloads[0], logits[0])
                print(f"logits         max|pipeline - CPU interpreter| {difference:.3g} (fp32 engine, one image)")
            triton_server.run_load(server, "m_preprocess", payloads, "images", args.clients, 5)  # warm-up
            print(_summary("preprocessing", triton_server.run_load(
                server, "m_preprocess", payloads, "images", args.clients, args.requests, images.numpy(), 0.0)))
            if args.pipeline_requests:
                triton_server.run_load(server, "m_pipeline", payloads, "logits", 1, 1)  # warm-up
                # the load test's bound on |served - interpreter| (tests/test_triton.py)
                print(_summary("pipeline", triton_server.run_load(
                    server, "m_pipeline", payloads, "logits", args.clients, args.pipeline_requests, logits,
                    1e-4 if not args.gpu else float("inf"))))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
