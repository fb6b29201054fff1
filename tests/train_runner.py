"""Runs ``lcnn-timm train`` on the tiny test models (registered on import), in-process or under torchrun.

Extra environment knobs for the tests: LCNN_TEST_STEP_DELAY (seconds to sleep
per step, so a test can kill the run mid-training), LCNN_TEST_SIGINT_IN_STEP (the
process sends itself SIGINT at the end of that 1-based step, after its backward), LCNN_TEST_NAN_AT_STEP (the
loss of that step becomes NaN) and LCNN_TEST_DUMP_RANKS (each rank saves its
final weights to <output>/rank<r>.pt). Exit status 3 on a non-finite loss, like the CLI.
A first argument ``--cli`` runs the rest through ``lcnn-timm train``'s own entry point instead.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny_models  # noqa: E402,F401

from lcnn_timm.train import trainer as trainer_module  # noqa: E402
from lcnn_timm.train.config import load_config, parse_overrides  # noqa: E402


def _around_train_step(before=None, after=None):
    """Run ``before(trainer)`` / ``after(trainer)`` around every ``Trainer.train_step``."""
    step = trainer_module.Trainer.train_step

    def wrapped(self, *args):
        if before:
            before(self)
        result = step(self, *args)
        if after:
            after(self)
        return result

    trainer_module.Trainer.train_step = wrapped


def main(argv):
    torch.set_num_threads(1)
    delay = float(os.environ.get("LCNN_TEST_STEP_DELAY", "0"))
    if delay:
        _around_train_step(before=lambda trainer: time.sleep(delay))
    sigint_step = int(os.environ.get("LCNN_TEST_SIGINT_IN_STEP", "-1"))
    if sigint_step >= 0:
        _around_train_step(after=lambda trainer: trainer.step == sigint_step and os.kill(os.getpid(), signal.SIGINT))
    nan_step = int(os.environ.get("LCNN_TEST_NAN_AT_STEP", "-1"))
    if nan_step >= 0:
        forward = trainer_module.LCNNTask.forward

        def poisoned_forward(self, *args):
            result = forward(self, *args)
            if self.steps_seen == nan_step:
                result["loss"] = result["loss"] * float("nan")
            self.steps_seen += 1
            return result

        trainer_module.LCNNTask.steps_seen = 0
        trainer_module.LCNNTask.forward = poisoned_forward
    if argv[:1] == ["--cli"]:
        from lcnn_timm.train.cli import main as cli_main

        return cli_main(argv[1:])
    cfg = load_config(None, parse_overrides(argv))
    trainer = trainer_module.Trainer(cfg)
    try:
        trainer.fit()
    except trainer_module.NonFiniteLossError as error:
        print(error)
        return 3
    if os.environ.get("LCNN_TEST_DUMP_RANKS"):
        state = trainer_module.unwrap_model(trainer.model).state_dict()
        torch.save(state, Path(cfg.output) / f"rank{trainer.rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
