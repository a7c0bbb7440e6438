"""
Stopping a training stage cleanly when the machine is taken away: SIGTERM (a preemptible cloud GPU,
`docker stop`, Kubernetes, SLURM, torchrun passing its own SIGTERM on) or a first Ctrl-C.

The four training stages (base_train, mid_train, chat_sft, chat_rl) create one `StageSaver`
(nanochat/checkpoint_manager.py, which holds one `Preemption`) before their loop and ask it
`should_stop()` at the top of every iteration, where the previous optimiser step is complete. When
it says yes, the stage skips its evaluations, saves a complete checkpoint of that step (every rank,
atomically) and `exit()` prints the command that continues the run exactly and exits with status 0.

Design choices:
- The signal handler only sets a flag (and writes one line with os.write, which is safe inside a
  handler, unlike print): the step in flight finishes, nothing is torn down half-way.
- A second Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint); repeated SIGTERMs are ignored,
  the save is already on its way (the sender's SIGKILL after its grace period is the hard stop).
- Under torchrun the signal can reach the ranks at different moments, and a rank that stopped alone
  would leave the others waiting in a collective. So the flag is all-reduced (MAX of one scalar)
  every step: all ranks stop after the same step. One rank runs no collective at all. The
  reduction costs one tiny all-reduce per step, next to the step's own gradient all-reduces.
- torchrun runs its workers in their own session, so a Ctrl-C in the terminal reaches torchrun
  only, which passes it on once: for the ranks it is a first Ctrl-C. torchrun itself then exits
  with the signal's failure status; the ranks exit 0 once their checkpoint is saved (within
  torchrun's 30 s before it kills them).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

import torch
import torch.distributed as dist

from nanochat.common import Compute, compute_cleanup, print0


class Preemption:
    """Watches for SIGTERM / SIGINT from construction on (call it in the main thread)."""

    def __init__(self, module: str, compute: Compute):
        self.module, self.compute = module, compute
        self.requested = False  # this process got a signal
        self.signal_name = ""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # the second Ctrl-C: abort now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.signal_name = True, signal.Signals(signum).name
            os.write(2, f"\n{self.signal_name}: saving a checkpoint after this optimiser step, then exiting "
                        f"(Ctrl-C again aborts without saving)\n".encode())

    def should_stop(self) -> bool:
        """True when any rank got a signal. Call it at the same point of every step on every rank."""
        if self.compute.world_size == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.compute.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def resume_command(self, step: int, model_tag: str) -> str:
        """The command line that continues this run from `step`: the same flags, plus the model tag
        (the one this run saved under) and the step."""
        args, argv = [], sys.argv[1:]
        i = 0
        while i < len(argv):
            arg = argv[i]
            i += 1
            key = arg[2:].partition("=")[0] if arg.startswith("--") else None
            if arg == "--" or key in ("resume_from_step", "model_tag"):
                if key and "=" not in arg and i < len(argv) and not argv[i].startswith("--"):
                    i += 1  # `--key value`: drop the value too
                continue
            args.append(arg)
        args += [f"--model_tag={model_tag}", f"--resume_from_step={step}"]
        flags = " ".join(shlex.quote(a) for a in args)
        world = self.compute.world_size
        if not self.compute.ddp:
            return f"python -m {self.module} {flags}"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local == world:
            return f"torchrun --standalone --nproc_per_node={world} -m {self.module} -- {flags}"
        return (f"torchrun --nnodes={world // local} --nproc_per_node={local} <your rendezvous flags> "
                f"-m {self.module} -- {flags}")

    def exit(self, step: int, checkpoint_dir: str, wandb_run=None) -> None:
        """After the checkpoint of `step` is saved in checkpoint_dir: say how to continue, leave the
        process group, exit 0."""
        print0(f"stopped by {self.signal_name or 'a signal on another rank'} after step {step}; "
               f"checkpoint in {checkpoint_dir}")
        print0(f"resume with: {self.resume_command(step, os.path.basename(checkpoint_dir))}")
        print0("(or --resume_from_step=latest: the newest complete checkpoint of that model tag)")
        if wandb_run is not None:
            wandb_run.finish()
        compute_cleanup()
        sys.exit(0)
