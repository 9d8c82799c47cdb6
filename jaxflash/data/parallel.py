"""An ordered map over worker processes that reads its input lazily.

`multiprocessing.Pool.imap` queues its whole input at once, which for the
corpus would mean every archive member in memory; this keeps at most a few
tasks a worker in flight. Results come back in input order, so the output does
not depend on the number of workers.
"""
import collections
import multiprocessing


def ordered_map(fn, items, workers, initializer=None, initargs=()):
  """Yields fn(item) for each item, in order, over `workers` processes.

  fn and initializer must be module-level functions. With workers <= 1 all runs
  in this process. Workers are spawned, not forked: the caller may hold
  threads (JAX, TFDS readers) that a fork would copy in a broken state.
  """
  if workers <= 1:
    if initializer is not None:
      initializer(*initargs)
    yield from map(fn, items)
    return
  context = multiprocessing.get_context('spawn')
  with context.Pool(workers, initializer, initargs) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.apply_async(fn, (item,)))
      if len(pending) >= 2 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()
