"""calibkernels from the command line: `python -m calibkernels` (or `calibkernels`) demo | bench."""

import argparse

import torch

from ._version import __version__

DEMO = """\
Trains a 64-256-10 MLP on scikit-learn's bundled digits data (1797 images of 8 x 8 pixels, 10
classes; nothing is downloaded) with cross-entropy, FL-3 and FLSD-53 through the fused ops, fits a
temperature on the validation split, and prints the paper's table: test error, ECE, AdaECE and
classwise ECE (15 bins) before and after temperature scaling. Writes reliability diagrams and the
test-NLL curve as PNGs. Needs scikit-learn, matplotlib and tqdm (pip install
'calibkernels[demo]'); about half a minute on 2 CPU cores at the default 300 epochs."""

BENCH = """\
Times the fused focal loss (forward + backward, gamma = 3) against the eager reference and
torch.compile of it, and the fused ECE (15 bins, from logits) against the eager reference and
torchmetrics, in alternating rounds, and prints each speed-up as the median of the per-round
ratios. Shapes: on the CPU 8192 x 1000, 65536 x 100 and 1024 x 32000 float32; on CUDA
65536 x 10, 65536 x 100, 65536 x 1000, 8192 x 32000, 8192 x 128256 and 4096 x 262144 bfloat16.
Needs torchmetrics (pip install 'calibkernels[bench]'); a few minutes on the CPU (the
torch.compile warm-up is the longest part), about one on a GPU."""


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m calibkernels",
        description="Fused focal-loss and calibration kernels for PyTorch: the paper's experiment "
                    "and the benchmarks.")
    parser.add_argument("--version", action="version",
                        version=f"calibkernels {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench}")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    demo = sub.add_parser("demo", help="the paper's experiment in miniature, on digits (~30 s)",
                          description=DEMO)
    demo.add_argument("--epochs", type=int, default=300, help="epochs per loss (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="the split's and the model's seed")
    demo.add_argument("--out", default="out/demo", help="folder for the PNGs (default out/demo)")
    demo.add_argument("--device", default=default_device,
                      help=f"where to train (default {default_device})")
    demo.add_argument("--json", dest="json_path", metavar="PATH",
                      help="also write every printed number to PATH as JSON")
    demo.add_argument("--temperature-criterion", choices=["ece", "nll"], default="ece",
                      help="fit T by the paper's ECE grid (default) or by NLL")

    bench = sub.add_parser("bench", help="fused vs eager, torch.compile and torchmetrics "
                                         "(a few minutes)", description=BENCH)
    bench.add_argument("--device", default=default_device,
                       help=f"where to time (default {default_device})")
    bench.add_argument("--repeats", type=int, default=20, help="alternating rounds (default 20)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo as job

        job.run(epochs=args.epochs, seed=args.seed, device=args.device, out=args.out,
                json_path=args.json_path, temperature_criterion=args.temperature_criterion)
    else:
        from . import bench as job

        job.run(device=args.device, repeats=args.repeats)


if __name__ == "__main__":
    main()
