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
    Ctrl-C that reaches it, `error: interrupted` and 130, a SIGTERM (`timeout`, `scancel`), `error: interrupted
    (SIGTERM)` and 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        import torch  # here, not at the top: an entry point imports this module before its slow imports
        from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

        # While the entry point's own code runs, a Ctrl-C or SIGTERM unwinds (the run ends its DataLoader workers
        # and its claim) and is reported below; outside it (between a sweep's jobs) it ends the process at once
        unwinding = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
        previous = {s: signal.signal(s, h) for s, h in unwinding.items()} if _installed_by == os.getpid() else {}
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
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside the training loop (which handles them), or a
            signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT  # second Ctrl-C
            exit_with(_interruption(signum), status=128 + signum)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    return wrapper


def exit_with(message, status=2):
    """End the process with one `error: <message>` line on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def first_line(error, limit=160):
    """The first line of an exception's message, at most `limit` characters ("" when it has none)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


class Terminated(KeyboardInterrupt):
    """A SIGTERM, unwinding as a Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated


def interrupt_in_one_line():
    """Ctrl-C from here on ends in `error: interrupted` and exit status 130 (SIGTERM: `error: interrupted
    (SIGTERM)` and 143, where Python would die without a word): an entry point calls it before its slow imports
    (torch, Hydra), where a Ctrl-C would otherwise print a traceback of whatever was loading. Nothing is written
    yet then, so the process ends at once: an exception raised in the middle of an import leaves half-imported
    modules behind, which the error handling would trip over. `exit_on_user_error` makes both unwind while the
    entry point's own code runs."""
    global _installed_by
    _installed_by = os.getpid()
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)


_installed_by = None


def _interrupted(signum, frame):
    if os.getpid() != _installed_by:  # a forked DataLoader worker: it stops quietly, as by default
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os._exit(128 + signum)
    print(f"error: {_interruption(signum)}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _interruption(signum):
    return "interrupted" + ("" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})")
