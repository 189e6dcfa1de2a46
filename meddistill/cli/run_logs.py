"""Where `meddistill run`'s logs go: a file per run, the terminal kept for progress and errors.

Without --verbose: every log record (ours, Ray's, Ray Train's, Python warnings) goes to
`<artifacts>/<job>/logs/run-<timestamp>.log`; the terminal shows our warnings and errors and
other libraries' errors only, printed through the rich console so they do not tear the progress bars. Workers' and Ray's
actors' output stays in Ray's session logs (`ray.init(log_to_driver=False)`), whose folder the
file names. With --verbose: today's stream on the terminal, and the file as well.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.serve", "ray.data")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def route_logs(log_dir: Path, console, verbose: bool) -> Path:
    """Attach the run's log file (and, unless verbose, take Ray's stream off the terminal); its path."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter(FORMAT))
    to_file.set_name("meddistill-run-file")
    root = logging.getLogger()
    root.addHandler(to_file)
    if verbose:
        for name in RAY_LOGGERS:  # Ray's loggers do not propagate to the root: give them the file too
            logging.getLogger(name).addHandler(to_file)
        return path

    from rich.logging import RichHandler

    def terminal(level: int) -> logging.Handler:
        handler = RichHandler(console=console, level=level, show_time=False, show_path=False)
        handler.set_name("meddistill-run-terminal")
        # Our warnings are for the user; a library's (bitsandbytes' missing kernels...) go to the file.
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or r.name.startswith("meddistill"))
        return handler

    for handler in list(root.handlers):
        if handler is not to_file and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.addHandler(terminal(logging.WARNING))
    take_ray_logs(to_file, terminal(logging.ERROR))
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers, warnings_logger.propagate = [to_file], False
    return path


def take_ray_logs(to_file: logging.Handler, terminal: logging.Handler) -> None:
    """Ray configures its loggers (own stderr handler, no propagation) on import: replace those handlers."""
    import ray  # noqa: F401 - importing ray is what installs its handlers

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)
                           or isinstance(h, logging.FileHandler)]  # keep Ray's own session files
        logger.addHandler(to_file)
        if name == "ray":
            logger.addHandler(terminal)
        logger.propagate = False


def note_ray_session() -> None:
    """Write where Ray's own (worker) logs are into the run's log file."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()  # private, but stable for years
    except Exception:  # noqa: BLE001 - a pointer for humans; never worth failing a run
        return
    logging.getLogger(__name__).info("Ray session logs (workers, actors): %s/logs", session)
