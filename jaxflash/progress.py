"""The training progress bar (steps, tokens, rate, ETA) and log lines that
print around it."""
import sys

import jax
import tqdm


class TrainProgress:
  """A bar counting tokens, titled with the step, on stderr.

  Shown only where stderr is a terminal, so logs and pipes stay clean, and
  only on process 0.
  """

  def __init__(self, start_step, steps, tokens_per_step, file=None):
    self.steps, self.tokens_per_step = steps, tokens_per_step
    self._bar = tqdm.tqdm(
        total=steps * tokens_per_step, initial=start_step * tokens_per_step,
        desc=f'step {start_step}/{steps}', unit='tok', unit_scale=True,
        dynamic_ncols=True, file=file or sys.stderr,
        disable=None if jax.process_index() == 0 else True)

  def update(self, done):
    """Step `done` (1-based) has finished."""
    self._bar.set_description_str(f'step {done}/{self.steps}', refresh=False)
    self._bar.update(self.tokens_per_step)

  def close(self):
    self._bar.close()


def write(line):
  """Prints a log line to stdout without breaking a progress bar."""
  tqdm.tqdm.write(line)
  sys.stdout.flush()
