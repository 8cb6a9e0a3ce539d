"""Run one benchmark measurement in a fresh process, so its peak memory belongs to it alone."""

import multiprocessing


def _child(queue, fn, kwargs):
    try:
        queue.put(fn(**kwargs))
    except Exception as error:  # Reported by the parent, which goes on with the other measurements.
        queue.put(dict(kwargs, error=f'{type(error).__name__}: {error}'))


def run_isolated(fn, **kwargs):
    """fn(**kwargs) in a spawned process (fn must be a module-level function); returns its dict, or the
    kwargs plus 'error' if it raised."""
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, fn, kwargs))
    process.start()
    result = queue.get()
    process.join()
    return result
