"""Mistakes a user can make end in one line that says what to do, never in a traceback."""
import functools
import sys


class UserError(Exception):
    """A problem the user can fix: a bad path, a missing dataset, a bad config value."""


def exit_on_user_error(main):
    """Wrap an entry point: a UserError (or a GPU out-of-memory) becomes `error: ...` and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except _out_of_memory_errors() as e:
            print(f"error: the GPU ran out of memory ({str(e).splitlines()[0][:120]}); "
                  "try a smaller dataset.batch_size or dataset.eval_batch_size", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def _out_of_memory_errors():
    import torch

    return (torch.cuda.OutOfMemoryError,)
