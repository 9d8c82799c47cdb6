"""AdamW with warmup then cosine or linear decay, clipping, and a decay mask."""
import jax
import optax


def learning_rate_schedule(opt_config, steps):
  """Linear warmup to the peak, then decay to min_lr_ratio * peak at `steps`."""
  peak = opt_config.learning_rate
  warmup = optax.linear_schedule(0.0, peak, max(1, opt_config.warmup_steps))
  decay_steps = max(1, steps - opt_config.warmup_steps)
  if opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps,
                                        alpha=opt_config.min_lr_ratio)
  else:
    decay = optax.linear_schedule(peak, peak * opt_config.min_lr_ratio,
                                  decay_steps)
  return optax.join_schedules([warmup, decay], [opt_config.warmup_steps])


def _decays(path, _):
  # Only matmul weights decay: biases, norms and embeddings do not.
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  return 'kernel' in names


def weight_decay_mask(params):
  return jax.tree_util.tree_map_with_path(_decays, params)


def make_optimizer(opt_config, steps):
  schedule = learning_rate_schedule(opt_config, steps)
  adamw = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                      eps=opt_config.eps, weight_decay=opt_config.weight_decay,
                      mask=weight_decay_mask)
  if opt_config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), adamw)
  return adamw
