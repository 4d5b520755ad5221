"""Mistakes a user can make end in one line that says what to do, never in a traceback."""
import functools
import os
import signal
import sys


class UserError(Exception):
    """A problem the user can fix: a bad path, a missing dataset, a bad config value."""


def choose(registry, name, what, message=None):
    """`registry[name]`, for a config value that picks code from one of this repository's closed lists; else a
    UserError (`message`, or one that names the option `what` and lists the choices)."""
    if isinstance(name, str) and name in registry:
        return registry[name]
    raise UserError(message or f"unknown {what} {name!r}; choose one of: {', '.join(registry)}")


def exit_on_user_error(main):
    """Wrap an entry point: a UserError, running out of GPU or host memory, a required config value left out
    or an interpolation that does not resolve becomes one `error: ...` line on stderr and exit status 2; a
    Ctrl-C that reaches it, `error: interrupted` and 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        import torch  # here, not at the top: an entry point imports this module before its slow imports
        from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

        if _installed_by == os.getpid():  # from here on a Ctrl-C unwinds, and is reported below
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return main(*args, **kwargs)
        except UserError as e:
            exit_with(e)
        except torch.cuda.OutOfMemoryError as e:
            exit_with(f"the GPU ran out of memory ({first_line(e, 120)}); "
                      "try a smaller dataset.batch_size or dataset.eval_batch_size")
        except (MemoryError, RuntimeError) as e:  # the host's memory: an allocation larger than the machine
            if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
                raise
            exit_with(f"the machine ran out of memory ({first_line(e) or 'MemoryError'}); try a smaller "
                      "dataset.batch_size, dataset.eval_batch_size or dataset.image_size")
        except MissingMandatoryValue as e:  # a `???` in the config that the command line did not fill in
            key = getattr(e, "full_key", None) or "a required config value"
            exit_with(f"{key} is required; pass {key}=... on the command line")
        except InterpolationResolutionError as e:  # a `${...}` given on the command line that does not resolve
            key = getattr(e, "full_key", None) or "a config value"
            exit_with(f"{key}: its interpolation does not resolve ({first_line(e)}); fix it, or write a literal "
                      f"${{ as \\${{")
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (which handles it itself), or a second one
            exit_with("interrupted", status=130)

    return wrapper


def exit_with(message, status=2):
    """End the process with one `error: <message>` line on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def first_line(error, limit=160):
    """The first line of an exception's message, at most `limit` characters ("" when it has none)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def interrupt_in_one_line():
    """Ctrl-C from here on ends in `error: interrupted` and exit status 130: an entry point calls it before its
    slow imports (torch, Hydra), where a Ctrl-C would otherwise print a traceback of whatever was loading.
    Nothing is written yet then, so the process ends at once: an exception raised in the middle of an import
    leaves half-imported modules behind, which the error handling would trip over. `exit_on_user_error`
    hands Ctrl-C back to Python's KeyboardInterrupt when the entry point's own code starts."""
    global _installed_by
    _installed_by = os.getpid()
    signal.signal(signal.SIGINT, _interrupted)


_installed_by = None


def _interrupted(signum, frame):
    if os.getpid() != _installed_by:  # a forked DataLoader worker: it stops quietly, as by default
        raise KeyboardInterrupt
    print("error: interrupted", file=sys.stderr, flush=True)
    os._exit(130)
