"""
Progress output, one way for every stage (printed on rank 0 only).

- Training (base_train, mid_train, chat_sft, chat_rl): one line per optimiser step, the same in
  every stage, by `TrainProgress`:

      step 00042/00420 (10.00%) | loss 3.141593 | lrm 1.0000 | dt 812.34ms | tok/s 64,512 | mfu 41.20% |
      time 0.55m | eta 5.1m                                         (one line; wrapped here)

  loss is the debiased exponential moving average (β 0.9) of the step's train loss (base and mid,
  as the reference; ema_beta=0 prints the step's own loss: SFT and RL); tok/s counts the whole
  global batch; mfu = FLOPs per token · tokens / dt / (peak · world size), n/a when the device's
  peak is unknown; time is the training time so far without evaluations and without each
  process's first step (compilation, warm-up); eta = remaining steps · mean step time. A stage
  whose horizon is a data fraction (mid_train's one epoch) passes `fraction`: the total is then
  estimated from it and shown as ~N. Stage-specific numbers follow as `| name value`.
- Evaluations (CORE, chat_eval, bits per byte): `EvalProgress` draws a bar redrawn in place on a
  terminal, and prints a plain line every `interval` seconds (and the final count, once it
  printed any) when the output is not a terminal: a log file gets readable lines, no carriage
  returns or escapes.
"""

from __future__ import annotations

import sys
import time

from nanochat.common import Compute, get_device_name, get_peak_flops, print0


class TrainProgress:
    """The progress line of a training loop (num_iterations None: the horizon is a data fraction);
    `first_step` is where this process started. `state` is a checkpoint's loop state (keys
    smooth_train_loss, total_training_time, timed_steps), so a resumed run continues the EMA,
    the clock and the ETA."""

    def __init__(self, compute: Compute, num_iterations: int | None, flops_per_token: float, first_step: int,
                 state: dict | None = None, ema_beta: float = 0.9):
        state = state or {}
        self.compute, self.t0 = compute, None
        self.num_iterations, self.flops_per_token = num_iterations, flops_per_token
        self.world_size, self.first_step, self.ema_beta = compute.world_size, first_step, ema_beta
        # peak bf16 FLOP/s of one device by name; None (MFU n/a) off CUDA and for unknown GPUs
        cuda = compute.device_type == "cuda"
        self.peak_flops = get_peak_flops(get_device_name(compute.device_type)) if cuda else None
        self.smooth_loss = state.get("smooth_train_loss", 0.0)  # EMA, debiased when shown
        self.total_time = state.get("total_training_time", 0.0)  # seconds of training steps, no evals
        self.timed_steps = state.get("timed_steps", 0)  # steps counted in total_time

    def totals(self, compute: Compute) -> dict:
        """Print and return the run's peak memory and training time (for the stage's report)."""
        peak_mib = compute.max_memory_allocated() / 1024 ** 2
        print0(f"peak memory: {peak_mib:.2f} MiB")
        print0(f"total training time: {self.total_time / 60:.2f}m")
        return {"peak memory (MiB)": round(peak_mib, 2), "total training time (m)": round(self.total_time / 60, 2)}

    def state(self) -> dict:
        return dict(smooth_train_loss=self.smooth_loss, total_training_time=self.total_time,
                    timed_steps=self.timed_steps)

    def start_step(self) -> None:
        """Start the clock of one optimiser step, once the device has finished what came before."""
        self.compute.synchronize()
        self.t0 = time.time()

    def update(self, step: int, loss: float, lrm: float, tokens: int, fraction: float | None = None,
               extra: dict | None = None, dt: float | None = None) -> dict:
        """Record the step that made `step` steps done (loss, LR multiplier, tokens over all ranks;
        its seconds: `dt`, else measured since start_step once the device is done); print the line
        on rank 0; return the numbers (for wandb, under train/)."""
        if dt is None:
            self.compute.synchronize()
            dt = time.time() - self.t0
        if self.ema_beta:
            self.smooth_loss = self.ema_beta * self.smooth_loss + (1 - self.ema_beta) * loss
            loss = self.smooth_loss / (1 - self.ema_beta ** step)
        if step > self.first_step + 1:  # a process's first step includes compilation and warm-up
            self.total_time += dt
            self.timed_steps += 1
        tok_per_sec = int(tokens / dt)
        flops_per_sec = self.flops_per_token * tokens / dt
        mfu = 100 * flops_per_sec / (self.peak_flops * self.world_size) if self.peak_flops else None  # percent
        if self.num_iterations:
            total, fraction, shown_total = self.num_iterations, step / self.num_iterations, f"{self.num_iterations:05d}"
        else:  # horizon by data: estimate the steps from the fraction consumed
            fraction = min(fraction or 0.0, 1.0)
            total = max(step, round(step / fraction)) if fraction > 0 else step
            shown_total = f"~{total:05d}"
        eta = (total - step) * (self.total_time / self.timed_steps if self.timed_steps else dt)
        line = (f"step {step:05d}/{shown_total} ({100 * fraction:.2f}%) | loss {loss:.6f} | lrm {lrm:.4f} | "
                f"dt {dt * 1000:.2f}ms | tok/s {tok_per_sec:,} | mfu {f'{mfu:.2f}%' if mfu else 'n/a'} | "
                f"time {self.total_time / 60:.2f}m | eta {eta / 60:.1f}m")
        extra = extra or {}
        print0(line + "".join(f" | {name} {value:.4f}" if isinstance(value, float) else f" | {name} {value:,}"
                              for name, value in extra.items()))
        return {"loss": loss, "lrm": lrm, "dt": dt, "tok_per_sec": tok_per_sec, **({"mfu": mfu} if mfu else {}),
                **extra}


class EvalProgress:
    """Progress of an evaluation (rank 0 prints): `update(done, status)` after each unit of work,
    `close()` at the end. On a terminal: `name [#####.....] done/total status`, redrawn in place;
    otherwise a plain line at most every `interval` seconds (and the final count once any was)."""

    def __init__(self, name: str, total: int, interval: float = 10.0, stream=None):
        self.name, self.total, self.interval = name, total, interval
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.last_print = time.monotonic()
        self.done, self.status, self.printed = 0, "", False

    def _line(self) -> str:
        status = f" {self.status}" if self.status else ""
        if self.tty:
            filled = round(20 * self.done / self.total) if self.total else 20
            return f"{self.name} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total}{status}"
        return f"{self.name}: {self.done}/{self.total}{status}"

    def update(self, done: int, status: str = "") -> None:
        self.done, self.status = done, status
        now = time.monotonic()
        if self.tty:
            print0(f"\r\033[K{self._line()}", end="", flush=True, file=self.stream)
            self.printed = True
        elif now - self.last_print >= self.interval:
            print0(self._line(), flush=True, file=self.stream)
            self.last_print, self.printed = now, True

    def close(self) -> None:
        """Finish the bar's line (terminal), or print the final count after periodic lines (log;
        an evaluation quicker than `interval` prints nothing: its caller reports the result)."""
        if self.printed:
            print0("" if self.tty else self._line(), flush=True, file=self.stream)
