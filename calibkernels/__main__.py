"""Command line: `python -m calibkernels demo` (the main job)."""

import argparse

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m calibkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on scikit-learn's digits with FLSD-53")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--gamma", default="flsd-53",
                      help='a float, "flsd-53" or "flsd-532" (default: flsd-53)')
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from . import demo as demo_job

        try:
            gamma = float(args.gamma)
        except ValueError:
            gamma = args.gamma
        demo_job.run(epochs=args.epochs, seed=args.seed, device=args.device, gamma=gamma)


if __name__ == "__main__":
    main()
