"""calibkernels from the command line.

    python -m calibkernels demo    the paper's experiment on scikit-learn's digits (make demo)
    python -m calibkernels bench   fused vs eager vs torch.compile on this device
"""

import argparse

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m calibkernels",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    demo = sub.add_parser("demo", help="train with CE, FL-3 and FLSD-53 on digits; calibration "
                                       "table before and after temperature scaling")
    demo.add_argument("--epochs", type=int, default=300, help="epochs per loss (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="out/demo", help="folder for the PNGs (default out/demo)")
    demo.add_argument("--device", default=default_device)
    demo.add_argument("--json", dest="json_path", metavar="PATH",
                      help="also write every printed number to PATH as JSON")
    demo.add_argument("--temperature-criterion", choices=["ece", "nll"], default="ece",
                      help="fit T by the paper's ECE grid (default) or by NLL")

    bench = sub.add_parser("bench", help="time focal loss and ECE at the contract's shapes")
    bench.add_argument("--device", default=default_device)
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
