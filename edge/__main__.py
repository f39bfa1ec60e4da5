"""``python -m edge train|infer``: on-device training and inference with LiteRT + numpy only."""
import argparse
import json
import sys

from edge import runner


def _parser():
    parser = argparse.ArgumentParser(prog="python -m edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an exported training model (.tflite)")
    t.add_argument("model", help="the .tflite file (signatures train/infer/get_weights/set_weights)")
    t.add_argument("--data", required=True, help=".npz with arrays x (float) and y (int labels)")
    t.add_argument("--epochs", type=int, default=1, help="total epochs (a resumed run continues to this)")
    t.add_argument("--batch-size", type=int, default=100, help="the last partial batch of an epoch is dropped")
    t.add_argument("--checkpoint-dir", help="write the weights to epoch_NNNN.npz here after every epoch")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest usable checkpoint in --checkpoint-dir (a newer unreadable or "
                        "non-matching one is skipped with a warning)")
    t.add_argument("--keep", type=int, default=3,
                   help="keep only the newest N checkpoints in --checkpoint-dir (default 3; N >= 1)")
    t.add_argument("--seed", type=int, default=0, help="shuffling seed (the order depends on seed and epoch)")
    t.add_argument("--loss-log", help="append one 'epoch,step,loss' line per step to this file")
    t.add_argument("--threads", type=int, default=None, help="interpreter threads")
    t.add_argument("--xnnpack", action="store_true",
                   help="use LiteRT's XNNPACK delegate: faster dense layers, more memory (edge/README.md)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("infer", help="run an exported model's infer signature")
    i.add_argument("model", help="the .tflite file")
    i.add_argument("--data", required=True, help=".npz with array x (and y for accuracy)")
    i.add_argument("--weights", help="a checkpoint .npz to load first (e.g. from train --checkpoint-dir)")
    i.add_argument("--batch-size", type=int, default=256)
    i.add_argument("--out", help="write the logits to this .npz (array 'logits')")
    i.add_argument("--threads", type=int, default=None)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            summary = runner.train(args.model, args.data, args.epochs, args.batch_size,
                                   checkpoint_dir=args.checkpoint_dir, resume=args.resume, seed=args.seed,
                                   loss_log=args.loss_log, num_threads=args.threads,
                                   progress=not args.no_progress, keep=args.keep, xnnpack=args.xnnpack)
        else:
            summary, logits = runner.infer(args.model, args.data, args.batch_size, weights=args.weights,
                                           num_threads=args.threads)
            if args.out:
                import numpy as np

                np.savez(args.out, logits=logits)
    except (ValueError, OSError) as err:
        # one line, no traceback: these are bad input (files, options) or a diverged run
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
