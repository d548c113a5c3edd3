"""`fit --nproc N`: start N training processes on this node through torchrun (`torch.distributed.run
--standalone`, a free rendezvous port), each running the same `fit` command without `--nproc`. Many nodes:
run torchrun yourself (README, "Many processes and nodes")."""

from __future__ import annotations

import os
import subprocess
import sys

from streamtrain.errors import UserError

__all__ = ["without_nproc", "torchrun_command", "launch_local"]


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` less every `--nproc N` / `--nproc=N`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, fit_argv: list[str]) -> list[str]:
    """The command that runs `streamtrain fit *fit_argv` in `nproc` processes on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "streamtrain", "fit", *fit_argv]


def launch_local(nproc: int, fit_argv: list[str]) -> int:
    """Run fit in `nproc` processes and wait; returns torchrun's exit code (each rank's own messages, such
    as a user error or a lost rank, are printed by that rank)."""
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc starts torchrun, but this process already runs under torchrun: drop --nproc")
    try:
        return subprocess.call(torchrun_command(nproc, fit_argv))
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops the ranks, which save first
        return 130
