"""``python -m lcnn_timm.launch``: torchrun, with torchrun's options, ending as the run ends.

``torchrun`` itself answers a Ctrl-C with its own ``SignalException`` traceback and exit status 1, and a worker's
error with a ``ChildFailedError`` report, after the workers have said what happened. This launcher runs torchrun's
own launch code and ends with the workers' status instead: 130 / 143 after SIGINT / SIGTERM (the workers have
checkpointed; rank 0 has named the checkpoint and the command that resumes it), a failed rank's exit status
(2 for a set-up error, 3 for a non-finite loss, ...), 0 when the run is done. torchrun's launch log stays.

    python -m lcnn_timm.launch --standalone --nproc_per_node 2 -m lcnn_timm.cli train --config X.yaml
"""
import signal
import sys
from typing import List, Optional

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except SignalException as stop:  # torchrun has passed the signal on and waited for the workers to stop
        return 128 + signal.Signals(stop.sigval).value
    except ChildFailedError as failed:  # the rank that failed first has said why
        return failed.get_first_failure()[1].exitcode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
