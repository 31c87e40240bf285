"""One error tree for twivapi, mapped to exit codes once, at the CLI edge.

    TwivapiError                     exit 3 unless said otherwise
    ├── ConfigError                  exit 2  a setting is missing or malformed (names the variable)
    ├── UsageError                   exit 2  a flag or argument is wrong
    ├── FixtureError                 exit 2  a fixture file is invalid (names file, step and field)
    ├── ExpectationFailed            exit 1  replay: an expectation was not met
    ├── SignatureError               (server side: becomes a 403, never an exit)
    ├── ApiError                     exit 3  Twilio or Vapi answered with an error
    │   ├── TwilioApiError
    │   └── VapiApiError
    ├── TargetUnreachable            exit 3  replay/tail could not reach the server
    ├── TunnelError                  exit 3  ngrok could not be started
    └── StoreError                   exit 3  the store (SQLite/Redis) failed or is unreachable

Messages never contain secrets: callers build them from names, not values.
"""

from __future__ import annotations


class TwivapiError(Exception):
    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(TwivapiError):
    exit_code = 2


class UsageError(TwivapiError):
    exit_code = 2


class FixtureError(TwivapiError):
    exit_code = 2

    def __init__(self, file: str, message: str, *, step: int | None = None, field: str | None = None):
        where = file
        if step is not None:
            where += f", step {step}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.file, self.step, self.field = file, step, field


class ExpectationFailed(TwivapiError):
    exit_code = 1


class SignatureError(TwivapiError):
    exit_code = 2


class ApiError(TwivapiError):
    exit_code = 3

    def __init__(self, message: str, *, status: int | None = None, code: int | str | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status, self.code = status, code


class TwilioApiError(ApiError):
    pass


class VapiApiError(ApiError):
    def __init__(self, message: str, *, status: int | None = None, code: int | str | None = None,
                 hint: str | None = None, retry_after: float | None = None):
        super().__init__(message, status=status, code=code, hint=hint)
        self.retry_after = retry_after   # seconds, from a 429's or 503's Retry-After header


class TargetUnreachable(TwivapiError):
    exit_code = 3


class TunnelError(TwivapiError):
    exit_code = 3


class StoreError(TwivapiError):
    exit_code = 3
