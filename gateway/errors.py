"""The gateway's exceptions: one small hierarchy, each class a kind of failure."""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a file the field engineer edits, with where it is."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ConfigError(GatewayError):
    """The configuration or a device map is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DecodeError(GatewayError):
    """A payload does not parse under its codec; the message is the dead letter's reason."""


class EventError(GatewayError):
    """A message on the local broker is not a well-formed event of its kind."""


class BufferFullError(GatewayError):
    """The buffer cannot take more readings (stop-intake bound or the disk is full)."""


class DiskFullError(BufferFullError):
    """The filesystem holding the buffer is full (SQLITE_FULL): a smaller group may still fit."""


class PublishError(GatewayError):
    """IoT Core (or the directory) did not accept a batch; keeps the MQTT reason code."""

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        self.reason_code = reason_code
        text = message if reason_code is None else f"[code:{reason_code}] {message}"
        super().__init__(text)


class BufferBusyError(GatewayError):
    """Another daemon holds the buffer's lock: two writers would corrupt it."""


class BufferLostError(GatewayError):
    """The buffer file was deleted or replaced under the running daemon, or cannot be written."""


class EnrollError(GatewayError):
    """`hub-gateway enroll` did not complete; the message says what happened and what was written."""


class EnrollRefused(EnrollError):
    """IoT Core answered on a rejected topic; keeps its status code, error code and message."""

    def __init__(self, operation: str, status_code: int | None, error_code: str | None, message: str | None) -> None:
        self.operation = operation
        self.status_code = status_code
        self.error_code = error_code
        self.error_message = message
        code = " ".join(str(part) for part in (status_code, error_code) if part is not None) or "no code"
        super().__init__(f"IoT Core refused {operation}: [{code}] {message or '(no message)'}")


class EnrollTimeout(EnrollError):
    """Something `enroll` waits for (the connection, an answer) did not come in time."""
