"""Train the book's networks on Fashion-MNIST: `python train.py --model NAME`.

With no flags this is the book's `train_ch6` with its recipe for the model (lr, batch size,
epochs, input side, plain SGD, Xavier init). `--model all` trains every network in turn and ends
with a table beside the book's numbers. The work lives in `flaxcnn.trainer`; this is its CLI.

Data parallel: `--devices N|all` (one process, several devices), and several processes with
`--coordinator HOST:PORT --num-processes N --process-id I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; `--coordinator auto` for Slurm/Open MPI detection), every
process running the same command. See `flaxcnn.trainer` and `flaxcnn.distributed`.
"""

import argparse
import os
import sys

import flaxcnn  # noqa: F401  (applies the XLA:CPU defaults before JAX starts)

if __name__ == "__main__":
    # glibc's huge pages for XLA's per-step temporaries: restarts once (flaxcnn/cpu.py), before
    # the 0.7 s of importing JAX and the models would be spent twice
    flaxcnn.cpu.reexec_with_huge_pages()

from flaxcnn import models, recipes  # noqa: E402

ALL = [n for n in models.names() if n != "vgg11"]  # the book trains the small VGG only


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a network of d2l chapter 7 on Fashion-MNIST with JAX/Flax.",
        epilog="Defaults are the book's recipe for the chosen model (flaxcnn.recipes).",
    )
    p.add_argument("--model", default="lenet_bn", choices=models.names() + ["all", "svm"],
                   help="network to train (default: lenet_bn); 'all' trains the book's seven "
                        "networks in turn; 'svm' the kernel SVM baseline")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's, 10)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's)")
    p.add_argument("--side", type=int, help="input side in pixels (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, dropout and order")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (book: 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (book: 0)")
    p.add_argument("--workdir", help="where checkpoints, metrics.jsonl and curves.png go "
                                     "(default: runs/<model>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
    p.add_argument("--train-size", type=int, help="use only the first N training examples")
    p.add_argument("--test-size", type=int, help="use only the first N test examples")
    p.add_argument("--data-dir", help="tfds data directory (default: tfds's, TFDS_DATA_DIR)")
    p.add_argument("--fashion-mnist-dir",
                   help="directory with the four Fashion-MNIST .gz files for offline "
                        "preparation (default: FASHION_MNIST_DIR, then Debian's "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype; parameters, BN statistics and loss stay float32")
    p.add_argument("--devices", default=None,
                   help="data-parallel over N devices of each process, or 'all' (default: "
                        "all); the batch size is the global batch, split across them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compilation-cache", metavar="DIR|off",
                   help="JAX's persistent compilation cache: a second run of the same "
                        "program loads it instead of compiling (default: "
                        "FLAXCNN_COMPILATION_CACHE, else a directory set for JAX, else "
                        "~/.cache/flaxcnn/xla-<cpu>; 'off' disables any; see "
                        "flaxcnn.compilation_cache)")
    p.add_argument("--precise-bn", type=int, default=20, metavar="BATCHES",
                   help="evaluate BatchNorm networks with statistics re-estimated over this many "
                        "training batches with the current weights (default 20); 0 evaluates "
                        "with the moving averages only, as the book does. Training is the same "
                        "either way, and both test accuracies are reported")
    dist = p.add_argument_group(
        "several processes (hosts)",
        "Run the same command in every process, each with its own --process-id. Process 0 "
        "hosts the coordinator and alone writes logs, metrics, plots and the report; the "
        "--workdir must be one shared directory, which every process checkpoints into.")
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0 (default: JAX_COORDINATOR_ADDRESS); 'auto' "
                           "lets JAX detect Slurm, Open MPI and other cluster environments")
    dist.add_argument("--num-processes", type=int, metavar="N",
                      help="number of processes (default: JAX_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, metavar="I",
                      help="this process, 0..N-1 (default: JAX_PROCESS_ID)")
    dist.add_argument("--heartbeat-timeout", type=int, metavar="S",
                      help="seconds without a heartbeat after which a process counts as "
                           "dead and JAX ends the others (default: 100); a collective that "
                           "loses its peer stops a process at once, with exit status 4")
    dist.add_argument("--init-timeout", type=int, metavar="S",
                      help="seconds to wait for all processes to connect (default: 300)")
    svm = p.add_argument_group("svm (with --model svm)")
    svm.add_argument("--kernel", default="rbf", help="linear, poly, rbf or sigmoid")
    svm.add_argument("--C", type=float, default=10.0, help="penalty C")
    svm.add_argument("--gamma", default="scale", help="kernel coefficient or 'scale'")
    svm.add_argument("--degree", type=int, default=3, help="polynomial degree")
    svm.add_argument("--coef0", type=float, default=0.0, help="r of poly and sigmoid kernels")
    args = p.parse_args(argv)
    if args.devices in (None, "all"):
        args.devices = None
    else:
        try:
            args.devices = int(args.devices)
        except ValueError:
            p.error(f"--devices takes a number or 'all', not {args.devices!r}")
        if args.devices <= 0:
            p.error("--devices must be positive")
    return p, args


def config_for(args, model):
    from flaxcnn.trainer import Config

    workdir = args.workdir
    if workdir and args.model == "all":
        workdir = os.path.join(workdir, model)
    return Config(
        model=model, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, side=args.side,
        seed=args.seed, momentum=args.momentum, weight_decay=args.weight_decay, workdir=workdir,
        resume=args.resume, checkpoint=not args.no_checkpoint, train_size=args.train_size,
        test_size=args.test_size, data_dir=args.data_dir, manual_dir=args.fashion_mnist_dir,
        dtype=args.dtype, devices=args.devices, progress=not args.no_progress,
        precise_bn=args.precise_bn,
    )


def book_table(reports):
    """Our results beside the book's (PyTorch, one CUDA GPU, 10 epochs). "test acc (moving
    BN)" is evaluated as the book does, with the moving-average BatchNorm statistics."""
    lines = [
        "| model | loss | train acc | test acc | test acc (moving BN) | examples/sec | "
        "book: loss | train acc | test acc | examples/sec |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        b = recipes.BOOK_RESULTS.get(r["model"])
        book = f"{b[0]:.3f} | {b[1]:.3f} | {b[2]:.3f} | {b[3]}" if b else "- | - | - | -"
        moving = r.get("test_acc_moving_bn")
        moving = "-" if moving is None else f"{moving:.3f}"
        lines.append(f"| {r['model']} | {r['loss']:.3f} | {r['train_acc']:.3f} | "
                     f"{r['test_acc']:.3f} | {moving} | {r['examples_per_sec']:.1f} | {book} |")
    return "\n".join(lines)


def main(argv=None):
    parser, args = parse_args(argv)
    from flaxcnn import compilation_cache, distributed

    # before anything compiles: programs compiled earlier are not cached
    compilation_cache.enable(args.compilation_cache or "auto")
    # Steps of 100 ms and more (the 96- and 224-pixel networks) run on this thread, their
    # temporaries kept mapped from step to step; LeNet's 10 ms steps keep Python's overlap
    # (with --model all the larger ones decide). Before anything starts a JAX backend.
    if args.model != "svm":
        flaxcnn.cpu.dispatch_inline_for(args.side or recipes.get(n).side
                                        for n in (ALL if args.model == "all" else [args.model]))

    try:  # before anything starts a JAX backend
        distributed.initialize(
            args.coordinator, args.num_processes, args.process_id,
            heartbeat_timeout=args.heartbeat_timeout or distributed.DEFAULT_HEARTBEAT_TIMEOUT,
            init_timeout=args.init_timeout or distributed.DEFAULT_INIT_TIMEOUT,
        )
    except distributed.SettingsError as e:
        parser.error(str(e))
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.model == "svm":
        from flaxcnn import svm

        try:
            svm.run(kernel=args.kernel, C=args.C, gamma=args.gamma, degree=args.degree,
                    coef0=args.coef0, train_size=args.train_size, test_size=args.test_size,
                    seed=args.seed, data_dir=args.data_dir, manual_dir=args.fashion_mnist_dir)
        except ValueError as e:  # bad parameters, raised before any data loads
            parser.error(str(e))
        return 0

    from flaxcnn import trainer

    names = ALL if args.model == "all" else [args.model]
    configs = []
    for name in names:
        try:
            configs.append(config_for(args, name).resolved())
        except trainer.UsageError as e:
            parser.error(str(e))
    for cfg in configs:  # every work directory checked before the first network trains
        try:
            trainer.check_workdir(cfg.workdir)
        except trainer.UsageError as e:
            parser.error(str(e))
    reports = []
    for cfg in configs:
        try:
            reports.append(trainer.fit(cfg))
        except trainer.UsageError as e:
            parser.error(str(e))
        except trainer.NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        except trainer.Interrupted as e:
            print(str(e), file=sys.stderr)
            return 128 + e.signum
        except Exception as e:
            if distributed.is_peer_failure(e):  # a collective failed: another process is gone
                distributed.exit_peer_lost(e)
            raise
    if len(reports) > 1:
        print()
        print(book_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
