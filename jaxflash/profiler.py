"""A jax.profiler trace of a range of training steps (config.profile_steps)."""
import os

import jax


class StepProfiler:
  """Traces steps first..last (1-based, inclusive) into workdir/profile.

  A run resumed inside the range traces what is left of it; one that stops
  early ends the trace where it stops.
  """

  def __init__(self, steps_range, workdir):
    self.first, self.last = steps_range or (0, -1)
    self.log_dir = os.path.join(workdir, 'profile')
    self.active = False

  def before_step(self, step):
    """Starts the trace if `step` (1-based) is the first one to trace."""
    if not self.active and self.first <= step <= self.last:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after_step(self, step, outputs):
    """Ends the trace once `step` is the last one, after `outputs` exist."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)  # steps are dispatched asynchronously
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
