"""What a person sees on the terminal while a command runs: one progress line per stage, the stages' own
summaries (plans, funnels, tables), and nothing of Ray's own output, which goes to a log file instead.

A command run through pipelines.core.cli opens a `session`. In it:

- Ray's output goes to the session's log file (opened, and its path said once, when first written to;
  `init_ray` writes to it as Ray starts): the workers' stdout/stderr (Ray Train workers' prints, DeepSpeed,
  Ray Data's tasks), which the driver receives with `log_to_driver` and would print; the `ray` and
  `ray.data` loggers (Ray Data's execution plans and progress log lines); Python warnings and logging.
  Ray Data's progress bars are switched off (`DataContext.enable_progress_bars`).
- Each stage has one status line: on a terminal it is redrawn in place (other output scrolls above it);
  otherwise it is printed now and then (see below). `begin(stage)` starts it, `progress(...)`
  feeds it (parts done, rows; training steps are read from the workers' `[train] step` lines), `end()`
  leaves its final state as a line of its own. (Without a terminal the first line comes after
  PROGRESS_EVERY_S and the wait doubles after each, up to PROGRESS_MAX_S.)

A Ray that a session started (rather than found running) is shut down when the session ends, while its
output still goes to the log (its last warnings would otherwise land after the command's summary).

With `verbose` nothing is redirected (Ray prints as it always does) and there is no status line. Outside
a session (library use, tests) every function here does nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

# Seconds before the first status line of a stage when stdout is not a terminal (a log, a pipe, `ray job logs`);
# the wait doubles after each line, up to PROGRESS_MAX_S, so a long stage does not fill its log.
PROGRESS_EVERY_S = 30.0
PROGRESS_MAX_S = 300.0
_TTY_REDRAW_S = 0.5
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TRAIN_STEP = re.compile(r"\[train\] step (\d+)/(\d+)\b.*?\bloss ([-\d.naif]+)(?:.*?\bETA (\d+) s)?")
_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray's JSON progress lines

_SESSION: _Session | None = None


@contextlib.contextmanager
def session(name: str, log_path: str | None, verbose: bool = False, status: bool = True) -> Iterator[None]:
    """Route Ray's output to `log_path` (unless verbose) and show status lines for the commands' stages.
    `status`: the command is one stage named `name` (a DAG runner calls begin() per stage instead)."""
    global _SESSION
    if _SESSION is not None:  # nested (a command calling another in-process): the outer one rules
        yield
        return
    s = _Session(name, log_path, verbose)
    _SESSION = s
    s.open()
    try:
        if status:
            begin(name)
        yield
        end()
    except BaseException:
        end(failed=True)  # (a no-op when the command has already said how it ended)
        raise
    finally:
        s.close()
        _SESSION = None


def attach_ray() -> None:
    """Called by init_ray once Ray is up (or found running): route its output to the session's log file."""
    if _SESSION is not None:
        _SESSION.attach_ray()


def begin(stage: str) -> None:
    """Start the status line of `stage` (ending the previous one)."""
    if _SESSION is not None and _SESSION.status is not None:
        _SESSION.status.begin(stage)


def progress(done: int | None = None, total: int | None = None, rows: int | None = None, unit: str | None = None,
             note: str | None = None) -> None:
    """Update the current stage's status line; arguments left None keep their value."""
    if _SESSION is not None and _SESSION.status is not None:
        _SESSION.status.update(done=done, total=total, rows=rows, unit=unit, note=note)


def end(failed: bool = False) -> None:
    """Leave the current stage's status line in its final state (before the stage prints its summary)."""
    if _SESSION is not None and _SESSION.status is not None:
        _SESSION.status.end(failed)


def discard() -> None:
    """Drop the current stage's status line (the command stops with an error message of its own)."""
    if _SESSION is not None and _SESSION.status is not None:
        _SESSION.status.discard()


def failed() -> None:
    """An unexpected error is about to be raised: end the status line and say where Ray's logs are."""
    if _SESSION is None:
        return
    end(failed=True)
    if _SESSION.log is not None and _SESSION.log.opened:
        print(f"pipelines.{_SESSION.name}: failed; the workers' output is in {_SESSION.log.path}",
              file=sys.stderr, flush=True)


def log_path() -> str | None:
    """The session's log file (None outside a session or with verbose)."""
    return _SESSION.log.path if _SESSION is not None and _SESSION.log is not None else None


# ---------------------------------------------------------------------------------------------


class _LogFile(io.TextIOBase):
    """Opened on first write (a command that never starts Ray leaves no file), line-buffered, thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._file is not None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        announce = False
        with self._lock:
            if self._file is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
                announce = True
            self._file.write(text)
        if announce:
            print(f"ray logs: {self.path}", flush=True)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


class _Session:
    def __init__(self, name: str, log_path: str | None, verbose: bool) -> None:
        self.name = name
        self.verbose = verbose
        self.log = _LogFile(log_path) if log_path and not verbose else None
        self.handler: logging.Handler | None = None
        self.status: _Status | None = None
        self._undo: list[Any] = []  # callables that restore what open()/attach_ray() changed, run in reverse
        self._ray_attached = False
        self._started_ray = False

    def open(self) -> None:
        if self.verbose:
            self.status = None
            return
        if self.log is not None:
            self._capture_fd2()
        tty = _isatty(sys.stdout)
        self.status = _Status(tty)
        if tty:  # other output must scroll above the status line, not run into it
            real_out, real_err = sys.stdout, sys.stderr
            sys.stdout = _Terminal(real_out, self.status, real_out)
            sys.stderr = _Terminal(real_err, self.status, real_out)
            self.status.out = real_out
            self._undo.append(lambda: (setattr(sys, "stdout", real_out), setattr(sys, "stderr", real_err)))
        else:
            self.status.out = sys.stdout
        self.status.start()
        if self.log is None:
            return
        self.handler = logging.StreamHandler(self.log)
        self.handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        self.handler.setLevel(logging.INFO)  # as Ray's console handlers (Ray Data's DEBUG goes to its session log)
        # Python logging and warnings: to the file, at the levels they have (libraries' INFO chatter, such as
        # botocore finding credentials, stays out); this project's own loggers at INFO.
        root, ours = logging.getLogger(), logging.getLogger("pipelines")
        saved = (root.handlers[:], ours.level)
        root.handlers[:] = [self.handler]
        ours.setLevel(logging.INFO)
        logging.captureWarnings(True)
        self._undo.append(lambda: (logging.captureWarnings(False), root.handlers.__setitem__(slice(None), saved[0]),
                                   ours.setLevel(saved[1])))
        if "ray" in sys.modules:
            self._route_ray_loggers()

    def _capture_fd2(self) -> None:
        """What is written to file descriptor 2 below Python (Ray's C++ core worker logs its warnings there, e.g.
        about actor constructor arguments) goes to the log file through a pipe; Python's sys.stderr keeps the
        terminal (a duplicate of the original descriptor)."""
        try:
            saved = os.dup(2)
            read_end, write_end = os.pipe()
        except OSError:
            return
        sys.stderr.flush()
        os.dup2(write_end, 2)
        os.close(write_end)
        old_stderr = sys.stderr
        if _fileno(old_stderr) == 2:  # (not when sys.stderr is already something else, e.g. a test's capture)
            sys.stderr = open(saved, "w", buffering=1, encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                              errors="backslashreplace", closefd=False)
        log = self.log
        assert log is not None

        def drain() -> None:
            with open(read_end, "rb") as pipe:
                for line in iter(pipe.readline, b""):
                    log.write("(stderr) " + line.decode("utf-8", "replace").rstrip("\n") + "\n")

        threading.Thread(target=drain, name="pipelines-fd2", daemon=True).start()

        def restore() -> None:
            sys.stderr.flush()
            os.dup2(saved, 2)  # closes this process's write end of the pipe: the reader sees its end
            sys.stderr = old_stderr
            os.close(saved)

        self._undo.append(restore)

    def _route_ray_loggers(self) -> None:
        """The `ray` and `ray.data` loggers print to stderr through their own handlers (they do not propagate):
        swap those for the log file."""
        for name in ("ray", "ray.data"):
            lg = logging.getLogger(name)
            for i, h in enumerate(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                        and h is not self.handler:
                    lg.handlers[i] = self.handler
                    self._undo.append(lambda lg=lg, h=h: lg.handlers.__setitem__(
                        slice(None), [h if x is self.handler else x for x in lg.handlers]))

    def attach_ray(self) -> None:
        """Idempotent; called before ray.init (loggers, progress bars) and after it (the workers' output)."""
        if self.verbose:
            return
        import ray
        import ray.data

        if not self._ray_attached:
            self._ray_attached = True
            self._started_ray = not ray.is_initialized()
            ctx = ray.data.DataContext.get_current()
            saved = ctx.enable_progress_bars
            ctx.enable_progress_bars = False  # the status line says how far a stage is
            self._undo.append(lambda: setattr(ctx, "enable_progress_bars", saved))
            if self.log is not None:
                self.log.write(f"==== pipelines.{self.name} {time.strftime('%Y-%m-%d %H:%M:%S')}: Ray "
                               f"{ray.__version__}; its logs and the workers' output follow\n")
        if self.log is None:
            return
        self._route_ray_loggers()
        try:  # the driver's printer of worker output (ray.init(log_to_driver=True)); private to Ray
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        removed = [(n, h) for n, h in dispatcher.handlers if n == "ray_print_logs"]
        if not removed:
            return
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("pipelines_log_file", self._worker_output)

        def restore() -> None:
            dispatcher.remove_handler("pipelines_log_file")
            for n, h in removed:
                dispatcher.add_handler(n, h)

        self._undo.append(restore)
        # The raylet's warnings (too many workers started, a worker killed for memory) reach the driver on another
        # channel, whose listener calls ray._private.worker.print_to_stdstream directly.
        import ray._private.worker as ray_worker

        printer = getattr(ray_worker, "print_to_stdstream", None)
        if printer is not None:
            ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: self._worker_output(data)
            self._undo.append(lambda: setattr(ray_worker, "print_to_stdstream", printer))

    def _worker_output(self, data: dict[str, Any]) -> None:
        """One batch of a worker's stdout or stderr lines, as Ray's driver would print them, into the file."""
        assert self.log is not None
        who = data.get("actor_name") or data.get("task_name") or ""
        ip = data.get("ip")
        where = f", ip={ip}" if ip and ip != data.get("localhost") else ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{where})"
        lines = [line for line in data.get("lines", []) if _TQDM_MAGIC not in line]
        if lines:
            self.log.write("".join(f"{prefix} {line}\n" for line in lines))
        if self.status is not None:
            for line in lines:
                self.status.observe(line)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
        if self._started_ray:  # Ray started under this command stops while its output still goes to the log
            try:
                import ray

                ray.shutdown()
            except Exception:  # noqa: BLE001 - the command's own outcome matters more
                pass
        while self._undo:
            try:
                self._undo.pop()()
            except Exception:  # noqa: BLE001 - restoring must not hide the command's own error
                pass
        if self.log is not None:
            self.log.close()


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Terminal(io.TextIOBase):
    """stdout or stderr on a terminal that also shows the status line: each write first clears the
    status line, and a finished line of output redraws it below."""

    def __init__(self, stream: TextIO, status: _Status, screen: TextIO) -> None:
        self._stream, self._status, self._screen = stream, status, screen

    def write(self, text: str) -> int:
        with self._status.lock:
            self._status.clear()
            self._stream.write(text)
            if text.endswith("\n"):
                self._stream.flush()
                self._status.draw()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self._stream, name)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Status:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.out: TextIO = sys.stdout
        self.lock = threading.RLock()
        self.stage: str | None = None
        self.drawn = False
        self.drawn_text = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reset(None)

    def _reset(self, stage: str | None) -> None:
        self.stage = stage
        self.started = self.last_line = time.time()
        self.every = PROGRESS_EVERY_S
        self.done: int | None = None
        self.total: int | None = None
        self.rows: int | None = None
        self.unit = "parts"
        self.note = ""
        self.eta: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tick, name="pipelines-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _tick(self) -> None:
        while not self._stop.wait(_TTY_REDRAW_S if self.tty else 1.0):
            with self.lock:
                if self.stage is None:
                    continue
                if self.tty:
                    if self.render() != self.drawn_text:
                        self.draw()
                elif time.time() - self.last_line >= self.every:
                    self._print(self.render())
                    self.every = min(2 * self.every, max(PROGRESS_MAX_S, PROGRESS_EVERY_S))

    def begin(self, stage: str) -> None:
        with self.lock:
            if self.stage is not None:
                self.end()
            self._reset(stage)
            if self.tty:
                self.draw()

    def update(self, **kw: Any) -> None:
        with self.lock:
            for k, v in kw.items():
                if v is not None:
                    setattr(self, k, v)

    def observe(self, line: str) -> None:
        """A worker's output line: the training loop's `[train] step N/T ... loss L ... ETA S s`."""
        m = _TRAIN_STEP.search(line)
        if m is not None:
            with self.lock:
                self.done, self.total, self.unit = int(m.group(1)), int(m.group(2)), "steps"
                self.note = f"loss {m.group(3)}"
                self.eta = float(m.group(4)) if m.group(4) else None

    def end(self, failed: bool = False) -> None:
        with self.lock:
            if self.stage is None:
                return
            quiet = not failed and self.done is None and self.rows is None and time.time() - self.started < 2
            line = self.render(final="failed" if failed else "done")
            if self.tty:
                self.clear()
            if not quiet:  # a stage with nothing to say (e.g. already committed) leaves no line
                self._print(line)
            self.stage = None

    def discard(self) -> None:
        with self.lock:
            self.clear()
            self.stage = None

    def render(self, final: str = "") -> str:
        elapsed = time.time() - self.started
        parts = []
        if self.unit == "steps" and self.done is not None:
            parts.append(f"step {self.done}/{self.total}")
        elif self.done is not None:
            parts.append(f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}")
        if self.rows is not None:
            rate = f" ({self.rows / elapsed:,.0f} rows/s)" if elapsed >= 1 and self.rows else ""
            parts.append(f"{self.rows:,} rows{rate}")
        if self.note:
            parts.append(self.note)
        if self.eta is not None and not final:
            parts.append(f"ETA {_duration(self.eta)}")
        when = f"{final} in {_duration(elapsed)}" if final else f"running {_duration(elapsed)}"
        return f"{self.stage}: " + ", ".join(parts + [when])

    def clear(self) -> None:
        if self.drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.drawn = False

    def draw(self) -> None:
        if self.stage is None or not self.tty:
            return
        import shutil

        width = shutil.get_terminal_size((100, 24)).columns
        self.drawn_text = self.render()
        self.out.write("\r\x1b[K" + self.drawn_text[: max(10, width - 1)])
        self.out.flush()
        self.drawn = True

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()
        self.last_line = time.time()
