"""twistd's log file lines, the same text for less CPU.

twistd writes every event through ``textFileLogObserver``, which formats it
with ``string.Formatter`` in Python (a call or more per field) and renders
the time stamp with ``strftime`` for each line: about a quarter of the CPU
of an inbound dialback session went into its one info line.  For the events
fedgate logs (a ``str`` format of plain named fields, a time, no failure,
no ``log_system``) :func:`classic_text` builds the identical line with
``str.format_map`` and the time stamp of the current second, kept; any
other event, or one its fast path cannot format, goes to Twisted's own
formatter, so the text never differs.  :func:`speed_up_text_files` puts it
on twistd's text file observers at start.
"""

from __future__ import annotations

from twisted.logger import FileLogObserver, formatTime

#: fractions of a second from which datetime rounds the time up to the next
#: second (to the microsecond, half to even): such times are not cached
_ROUNDS_UP = 0.9999995


def classic_text(fallback, time_format: str | None):
    """A ``formatEvent`` for :class:`FileLogObserver` giving what
    ``fallback`` (Twisted's ``formatEventAsClassicLogText`` with
    ``time_format``) gives, ``"{time} [{namespace}#{level}] {text}\\n"``."""
    last = [None, ""]  # the second last rendered, its time stamp

    def format_event(event):
        fmt = event.get("log_format")
        when = event.get("log_time")
        if (type(fmt) is not str or type(when) is not float or when < 0 or time_format is None
                or "log_failure" in event or "log_system" in event or "log_flattened" in event):
            return fallback(event)
        try:
            # the named fields as Twisted formats them; "{f()}" (a call),
            # a missing field or positional ones raise: Twisted's way then
            text = fmt.format_map(event)
        except Exception:
            return fallback(event)
        if not text:
            return fallback(event)
        second = int(when)
        if last[0] == second and when - second < _ROUNDS_UP:
            stamp = last[1]
        else:
            stamp = formatTime(when, time_format)
            if when - second < _ROUNDS_UP:
                last[0], last[1] = second, stamp
        level = event.get("log_level")
        line = "{} [{}#{}] {}".format(stamp, event.get("log_namespace", "-"),
                                      "-" if level is None else level.name, text)
        return line.replace("\n", "\n\t") + "\n"

    return format_event


def _time_format_of(format_event) -> tuple[bool, str | None]:
    """(True, its time format) for the ``formatEvent`` that
    ``textFileLogObserver`` makes, else (False, None)."""
    if getattr(format_event, "__qualname__", "") != "textFileLogObserver.<locals>.formatEvent":
        return False, None
    code, cells = format_event.__code__, format_event.__closure__ or ()
    if code.co_freevars != ("timeFormat",) or len(cells) != 1:
        return False, None
    value = cells[0].cell_contents
    return (True, value) if value is None or isinstance(value, str) else (False, None)


def speed_up_text_files(publisher=None) -> int:
    """Give every text file observer ``publisher`` (the global one) has now,
    wrapped in a level filter or not, :func:`classic_text`; returns how many
    it changed.  Anything else (and an observer done already) is left alone;
    like :func:`fedgate.tap.filter_log_level` this reads the publisher's
    ``_observers`` and changes nothing when it is missing."""
    if publisher is None:
        from twisted.logger import globalLogPublisher as publisher
    changed = 0
    for observer in list(getattr(publisher, "_observers", None) or ()):
        observer = getattr(observer, "observer", observer)  # a fedgate.tap.LevelFilter
        if not isinstance(observer, FileLogObserver):
            continue
        ours, time_format = _time_format_of(observer.formatEvent)
        if ours:
            observer.formatEvent = classic_text(observer.formatEvent, time_format)
            changed += 1
    return changed
