"""Decoder latency: torch vs ONNX Runtime on CPU, B=1, L in {1, 10, 100}.

    python bench/bench_decoders_runtime.py --model nano --threads 1

Exports the model's decoders to a temporary folder (or uses --onnx DIR), times each
unit decoder with both runtimes on the same inputs (median of --repeats after warm-up)
and prints a markdown table with the ratio torch / onnxruntime (> 1: ONNX Runtime faster).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from refvlm_export.runtime import OnnxRuntimeDecoders
from refvlm_export.onnx_export import export_model, load_export_model, pyramid_strides
from refvlm_export.parity import decoder_inputs


def median_ms(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", help="preset name or model folder")
    parser.add_argument("--onnx", default=None, help="existing export of the same model (else a temporary one)")
    parser.add_argument("--lengths", default="1,10,100")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_export_model(args.model).eval()
    folder = args.onnx or tempfile.mkdtemp(prefix="refvlm_bench_")
    if args.onnx is None:
        export_model(model, folder, encoders=False)
    ort_decoders = OnnxRuntimeDecoders(folder, "cpu", model.config, threads=args.threads)
    size = model.config.vision.image_size
    print(f"model {model.config.name}, image {size}px, CPU {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), torch {torch.__version__}, onnxruntime "
          f"{__import__('onnxruntime').__version__}, median of {args.repeats}\n")
    print("| decoder | L | torch ms | onnxruntime ms | torch / ort |")
    print("|---|---:|---:|---:|---:|")
    for unit in model.decoders:
        for length in (int(v) for v in args.lengths.split(",")):
            inputs = decoder_inputs(model.llm.hidden_size, model.encoder.pyramid_channels, pyramid_strides(model),
                                    1, length, length, size)
            with torch.no_grad():
                t_torch = median_ms(lambda: model.decoders[unit](*inputs), args.repeats)
            t_ort = median_ms(lambda: ort_decoders.run(unit, *inputs), args.repeats)
            print(f"| {unit} | {length} | {t_torch:.2f} | {t_ort:.2f} | {t_torch / t_ort:.2f} |")


if __name__ == "__main__":
    main()
