"""Settings: config/processor.toml, overridden by CANCELPROC_* environment variables.

Paths in the file are relative to the app root, the folder holding config/
(as a WHMCS install is a folder with its hooks and templates).
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.numbers import list_currencies
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from processor.errors import ConfigError
from processor.text import address_problem, header_problem, text_problem

ENV_PREFIX = "CANCELPROC_"
DEFAULT_CONFIG = Path("config") / "processor.toml"


def _header_safe(value: str) -> str:
    """A value that goes into an email header: one line, no control characters."""
    if header_problem(value):
        raise ValueError("must be one line without control characters")
    return value


def _address(value: str) -> str:
    _header_safe(value)
    if address_problem(value):
        raise ValueError(f"{value!r} is not an email address (name@example.com)")
    return value


def clock_time_problem(at: str) -> str | None:
    """Why `at` is not a time of day as HH:MM (24-hour), or None."""
    try:
        dt.time.fromisoformat(at)
    except ValueError:
        return f"{at!r} is not a time of day; use HH:MM (24-hour), e.g. 02:05"
    return None if len(at) == 5 else f"{at!r}: use HH:MM (24-hour), e.g. 02:05"


def _plain_text(value: Any) -> Any:
    """Every text setting: no control characters but line breaks and tabs, valid UTF-8."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise ValueError(f"the text {problem}")
    return value


def _path(value: str) -> str:
    """A path the operating system can take (checked here, not when a command first opens it)."""
    if len(value.encode("utf-8")) > 4095 or any(len(part.encode("utf-8")) > 255 for part in value.split("/")):
        raise ValueError("path too long (at most 255 bytes per name, 4095 in all)")
    return value


# Shared by the three models: unknown keys are errors; floats are finite; text is bounded.
_MODEL = dict(extra="forbid", allow_inf_nan=False, str_max_length=4095)
A_YEAR_OF_MINUTES = 366 * 24 * 60


class SmtpSettings(BaseModel):
    """The `smtp` delivery backend. The password is never in this file: it is read from the
    environment variable named by password_env, or from password_file."""

    model_config = ConfigDict(**_MODEL)  # type: ignore[typeddict-item]

    host: str = "localhost"
    port: int = Field(587, ge=1, le=65535)
    # starttls: plain connection upgraded with STARTTLS (port 587); ssl: implicit TLS (port
    # 465); none: no encryption (only for a relay on localhost).
    security: Literal["starttls", "ssl", "none"] = "starttls"
    username: str = ""
    password_env: str = "CANCELPROC_SMTP_PASSWORD"
    password_file: str = ""
    timeout_seconds: float = Field(30, gt=0, le=600)
    # A PEM file of CA certificates to trust instead of the system's ("" = system).
    ca_file: str = ""

    _check_host = field_validator("host", "username")(_header_safe)
    _check_text = field_validator("*")(_plain_text)
    _check_paths = field_validator("password_file", "ca_file")(_path)

    @field_validator("password_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):  # "": no password from the environment
            raise ValueError(f"{value!r} is not an environment variable name (letters, digits, '_')")
        return value


def _url(value: str) -> str:
    """A web address for a merge field: http(s), one line, no spaces ("" = none)."""
    if value and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise ValueError(f"{value!r} is not a web address (https://billing.example.com/)")
    return value


class EmailSettings(BaseModel):
    model_config = ConfigDict(**_MODEL)  # type: ignore[typeddict-item]

    company_name: str = "Example Hosting"
    from_address: str = "billing@example.test"
    staff_address: str = "support@example.test"
    signature: str = "Example Hosting Billing Team"
    # The signature per language, for the emails written in it (de = "..."); others get `signature`.
    signatures: dict[str, str] = Field(default_factory=dict)
    # Merge fields whmcs_url (WHMCS's System URL) and whmcs_admin_url / whmcs_admin_link.
    system_url: str = "https://billing.example.test/"
    admin_url: str = "https://billing.example.test/admin/"
    # ISO 4217 code of service_recurring_amount ("EUR": "10,00 €" for a German client); "" = the number alone.
    currency: str = ""
    # The operator's own templates, searched before the built-in ones ("" = none).
    templates_dir: str = "templates"
    delivery: Literal["folder", "smtp", "console"] = "folder"
    outbox_dir: str = "var/outbox"
    send_after_run: bool = True
    # `requests create` sends the client's confirmation and the staff notice itself, at once
    # (off: they wait for the next run or `emails send`).
    send_after_create: bool = True
    max_attempts: int = Field(10, ge=1, le=100)
    retry_backoff_minutes: int = Field(5, ge=0, le=A_YEAR_OF_MINUTES)
    retry_backoff_max_minutes: int = Field(720, ge=0, le=A_YEAR_OF_MINUTES)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)

    _check_text = field_validator("*")(_plain_text)
    _check_paths = field_validator("templates_dir", "outbox_dir")(_path)

    _check_from = field_validator("from_address")(_address)
    _check_company = field_validator("company_name")(_header_safe)
    _check_urls = field_validator("system_url", "admin_url")(_url)

    @field_validator("signatures")
    @classmethod
    def _by_language(cls, signatures: dict[str, str]) -> dict[str, str]:
        # Keys as template folders are named ("de_at"), so "de-AT" finds the same one.
        checked = {}
        for language, signature in signatures.items():
            if not re.fullmatch(r"[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})?", language):
                raise ValueError(f"{language!r} is not a language code (de, de_AT)")
            _plain_text(signature)
            checked[language.lower().replace("-", "_")] = signature
        return checked

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, value: str) -> str:
        if value and value not in list_currencies():
            raise ValueError(f"{value!r} is not an ISO 4217 currency code (USD, EUR, GBP, ...)")
        return value

    @field_validator("staff_address")
    @classmethod
    def _staff(cls, value: str) -> str:
        return _address(value) if value else value


# Stripe's subscription cancellation feedback values (cancellation_details.feedback):
# the default reason_codes.
STRIPE_REASON_CODES = ("too_expensive", "missing_features", "switched_service", "unused", "customer_service",
                       "too_complex", "low_quality", "other")


class WhmcsImportSettings(BaseModel):
    """`cancelproc import --from whmcs`: what WHMCS has no column for."""

    model_config = ConfigDict(**_MODEL)  # type: ignore[typeddict-item]

    # Language code for a client whose WHMCS language is empty (WHMCS's own default) or
    # one this importer does not know.
    default_language: str = Field("en", pattern=r"^[A-Za-z]{2,3}(_[A-Za-z0-9]{2,8})?$")
    # WHMCS keeps only free text: a request's reason code is the first of these whose
    # keyword (any letter case) its reason contains, else default_reason_code.
    reason_keywords: dict[str, str] = Field(default_factory=dict)
    default_reason_code: str = "other"

    _check_text = field_validator("*")(_plain_text)

    @field_validator("reason_keywords")
    @classmethod
    def _keywords(cls, keywords: dict[str, str]) -> dict[str, str]:
        for word, code in keywords.items():
            if not word.strip():
                raise ValueError("a keyword must not be empty (it would match every reason)")
            _plain_text(word)
            _plain_text(code)
        return keywords


def _reminder_days(days: list[int]) -> list[int]:
    """Days before the effective date, each at most once, latest reminder last ([7, 1])."""
    if len(set(days)) != len(days):
        raise ValueError(f"{days}: each day at most once")
    return sorted(days, reverse=True)


ReminderDays = list[typing.Annotated[int, Field(ge=1, le=366)]]


class ProductSettings(BaseModel):
    """`[products."ID"]`: the lifecycle of one product's cancellations. ID is the product's
    external id (WHMCS's product id), or its name for a product without one. A key left out
    takes the default, which is today's behaviour (or, for reminder_days, the top-level one)."""

    model_config = ConfigDict(**_MODEL)  # type: ignore[typeddict-item]

    # Days before the cancellation takes effect on which the client is reminded; None: the
    # top-level reminder_days.
    reminder_days: ReminderDays | None = None
    # Suspend at the due date, cancel this many days later (0: cancel at the due date).
    grace_days: int = Field(0, ge=0, le=366)
    # An End of Billing Period request made fewer than this many days before the next due
    # date takes effect at the due date after it.
    notice_days: int = Field(0, ge=0, le=366)
    # A service is cancelled no earlier than this many months after its registration date.
    minimum_term_months: int = Field(0, ge=0, le=120)

    _check_reminders = field_validator("reminder_days")(
        lambda days: None if days is None else _reminder_days(days))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False, **_MODEL  # type: ignore[typeddict-item]
    )

    database_url: str = "sqlite:///var/cancelproc.db"
    business_timezone: str = "UTC"
    # SQLite: how long to wait for a database file locked by another program (or writer).
    sqlite_busy_timeout_seconds: float = Field(30, ge=0, le=3600)
    chunk_size: int = Field(2000, ge=1, le=50_000)
    lease_seconds: int = Field(600, ge=10, le=7 * 24 * 3600)
    # Per-request hooks (PreModuleTerminate, EmailPreSend, TerminateAccount) of different
    # requests of a chunk run in up to this many threads at once: slow network calls wait
    # side by side. 1: one request at a time.
    hook_concurrency: int = Field(16, ge=1, le=256)
    max_attempts: int = Field(5, ge=1, le=100)
    retry_backoff_minutes: int = Field(60, ge=0, le=A_YEAR_OF_MINUTES)
    retry_backoff_max_minutes: int = Field(1440, ge=0, le=A_YEAR_OF_MINUTES)
    cancel_unpaid_invoices: bool = True
    # "credit": an Immediate request applied before the end of a period the client paid
    # credits the unused days (processor/credits.py); "none": no money moves (as before).
    immediate_refund: Literal["none", "credit"] = "none"
    # Stripe's cancellation feedback values, so churn reads the same as a Stripe export. An
    # operator's own list replaces them; requests already stored keep their codes (and report).
    reason_codes: list[str] = Field(
        default_factory=lambda: list(STRIPE_REASON_CODES),
        min_length=1,
    )
    # Operator hook files (hooks/*.py, `_`-prefixed skipped), loaded at the start of each command.
    hooks_dir: str = "hooks"
    # Load hook files (and their folder) that users other than the owner may write. Off:
    # such a file is refused with one line naming it (hook files are code).
    hooks_allow_unsafe_permissions: bool = False
    # `cancelproc schedule` (hosts without cron): run daily at these local times (HH:MM, business_timezone).
    schedule_times: list[str] = Field(default_factory=lambda: ["02:05"], min_length=1)
    # Prometheus text file written after each run and `emails send` ("" = none).
    metrics_file: str = ""
    # `cancelproc status` is unhealthy when the last successful run is older than this.
    status_max_age_hours: float = Field(26, gt=0, le=366 * 24)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    # Days before a cancellation takes effect on which the client is reminded ([]: none).
    reminder_days: ReminderDays = Field(default_factory=lambda: [7, 1])
    email: EmailSettings = Field(default_factory=EmailSettings)
    whmcs: WhmcsImportSettings = Field(default_factory=WhmcsImportSettings)
    # Per product, by its external id (or its name when it has none): [products."12"].
    products: dict[str, ProductSettings] = Field(default_factory=dict)

    # Not settings: where they came from, so relative paths and errors can name them.
    app_root: Path = Field(default=Path("."), exclude=True)
    config_file: Path | None = Field(default=None, exclude=True)

    _check_text = field_validator("*")(_plain_text)
    _check_paths = field_validator("hooks_dir", "metrics_file")(_path)

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        # Checked here so that the error names the file or variable; the messages never
        # quote the URL (it may hold a password).
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "cannot parse it (e.g. sqlite:///var/cancelproc.db or postgresql://user@host/dbname)") from None
        # postgres:// is how many hosts hand out the URL; open_database reads it as postgresql.
        if url.get_backend_name() not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(f"{url.get_backend_name()!r} is not supported (sqlite:///PATH or postgresql://...)")
        if url.get_backend_name() == "sqlite":
            if not url.database or url.database == ":memory:":
                raise ValueError("a SQLite database needs a file: sqlite:///var/cancelproc.db")
            _path(url.database)
        return value

    @field_validator("business_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Europe/London") from None
        return value

    @field_validator("schedule_times")
    @classmethod
    def _clock_times(cls, times: list[str]) -> list[str]:
        for at in times:
            problem = clock_time_problem(at)
            if problem:
                raise ValueError(problem)
        return times

    @field_validator("reason_codes")
    @classmethod
    def _plain_codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not code or not code.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"reason code {code!r} must be letters, digits, '_' or '-'")
        return codes

    _check_reminders = field_validator("reminder_days")(_reminder_days)

    def for_product(self, external_id: str | None, name: str) -> ProductSettings:
        """The settings of a product: its table by external id, else by name, else the defaults
        (with the top-level reminder_days)."""
        found = (self.products.get(external_id) if external_id is not None else None) \
            or self.products.get(name)
        if found is None:
            return ProductSettings(reminder_days=self.reminder_days)
        if found.reminder_days is None:
            return found.model_copy(update={"reminder_days": self.reminder_days})
        return found

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the file: an operator overrides one value without editing it.
        return env_settings, init_settings

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.business_timezone)

    def path(self, relative: str | Path) -> Path:
        """A path from the config, resolved against the app root."""
        p = Path(relative)
        return p if p.is_absolute() else self.app_root / p

    def resolved_database_url(self) -> str:
        """The database URL with a relative SQLite path made relative to the app root."""
        prefix = "sqlite:///"
        url = self.database_url
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix):]))
        return url


def load_settings(config_path: Path | None = None) -> Settings:
    """Read the config file (explicit, $CANCELPROC_CONFIG, or ./config/processor.toml if present).

    CANCELPROC_* environment variables override the file (pydantic-settings reads them).
    A ConfigError names the file it was read from in `config_file` (None: no file found).
    """
    environ = os.environ
    explicit = config_path or (Path(environ[ENV_PREFIX + "CONFIG"]) if environ.get(ENV_PREFIX + "CONFIG") else None)
    path = explicit or DEFAULT_CONFIG
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long, say
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    if explicit is not None and not found:
        raise ConfigError(f"{path}: config file not found")
    try:
        settings = _settings(_read_toml(path) if found else {}, path if found else None, environ)
        _refuse_unknown_variables(environ, settings.email.smtp.password_env)
    except ConfigError as exc:
        exc.config_file = path.resolve() if found else None
        raise
    return settings


def settings_without_errors(config_file: Path) -> Settings | None:
    """The settings of a config file that does not load, its wrong keys left at their
    defaults: for the nightly job's failure record, whose metrics file and staff email
    should still go where the operator set them (cli/app.py). None when the file is not
    TOML, or what is wrong does not come from the file (an environment variable)."""
    try:
        data = _read_toml(config_file)
        try:
            return _settings(data, config_file, os.environ)
        except ConfigError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                return None
            for error in exc.__cause__.errors():
                _drop(data, error["loc"])
            return _settings(data, config_file, os.environ)
    except (ConfigError, KeyError):
        return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None


def _settings(data: dict[str, Any], path: Path | None, environ: Mapping[str, str]) -> Settings:
    """The file's data validated, with the environment's overrides. Paths are relative to the
    app root: the folder holding config/ (the working directory when there is no file)."""
    app_root = path.resolve().parent.parent if path is not None else Path.cwd()
    try:
        return Settings(**data, app_root=app_root, config_file=path)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, environ)) from exc
    except SettingsError as exc:  # a list or table in a variable that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1) if field else "?"
        variable, key = _variable_not_json(name, environ)
        raise ConfigError(f"environment variable {variable}: {key}: not valid JSON "
                          '(a list is written ["a", "b"], a table {"key": "value"})') from None


def _variable_not_json(name: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """(variable, dotted key) of the value pydantic-settings could not read as JSON. It names
    the top-level field alone; for a section ([whmcs]) the variable is one of its keys'."""
    top = f"{ENV_PREFIX}{name.upper()}"
    field = Settings.model_fields.get(name)
    section = field.annotation if field else None
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return top, name
    # Only a list's or a table's value is read as JSON.
    structured = {k for k, f in section.model_fields.items() if typing.get_origin(f.annotation) in (list, dict)}
    for variable, value in environ.items():
        key = variable.upper().removeprefix(top + "__").lower()
        if variable.upper().startswith(top + "__") and key in structured:
            try:
                json.loads(value)
            except ValueError:
                return variable.upper(), f"{name}.{key}"
    return top, name


def _drop(data: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    """Remove the key a validation error is about (`reason_codes.0`: the whole list).
    KeyError when the file does not hold it: the value came from the environment."""
    if not loc:  # about the settings as a whole
        raise KeyError(loc)
    table = data
    for part in loc[:-1]:
        if not isinstance(table.get(str(part)), dict):
            break
        table = table[str(part)]
    else:
        del table[str(loc[-1])]
        return
    del table[str(part)]


# CANCELPROC_* variables read besides the settings: the config file's path, --debug for
# every command (cli/app.py), a log line per hook call (cli/app.py).
OTHER_VARIABLES = frozenset({"CONFIG", "DEBUG", "TRACE_HOOKS"})


def _keys(model: type[BaseModel]) -> list[str]:
    return [name for name in model.model_fields if name not in ("app_root", "config_file")]


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The settings model of a table: () is the top level, ("email", "smtp") is [email.smtp],
    ("products", "12") is [products."12"] (a table of tables: its keys are the operator's)."""
    model: type[BaseModel] = Settings
    parts = iter(loc)
    for part in parts:
        annotation = model.model_fields[str(part)].annotation
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            next(parts, None)
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation
    return model


def setting_variables(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> list[str]:
    """Every variable that sets a setting or a table of them (CANCELPROC_EMAIL__SMTP__HOST)."""
    names = []
    for key in _keys(model):
        name = prefix + key.upper()
        names.append(name)
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += setting_variables(annotation, name + "__")
    return names


def _refuse_unknown_variables(environ: Mapping[str, str], password_env: str) -> None:
    """A CANCELPROC_* variable that is no setting is a typo (CANCELPROC_EMAIL_DELIVERY for
    CANCELPROC_EMAIL__DELIVERY), which would otherwise be ignored without a word."""
    known = {*setting_variables(), *(ENV_PREFIX + name for name in OTHER_VARIABLES), password_env.upper()}
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in known:
            continue
        # Compared without the prefix they all share, which would make anything look close.
        close = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX),
                                          [k.removeprefix(ENV_PREFIX) for k in known], n=1, cutoff=0.75)
        hint = (f"did you mean {ENV_PREFIX}{close[0]}?" if close else
                "settings are CANCELPROC_ and the key in capitals, tables joined by '__' (CANCELPROC_EMAIL__DELIVERY)")
        raise ConfigError(f"environment variable {name}: not a cancelproc setting; {hint}")


_SECRET_KEYS = {"database_url"}  # may hold a password: never quoted in an error


def _describe(exc: ValidationError, path: Path | None, environ: Mapping[str, str]) -> str:
    """One line for the first error: where the value came from, the key, what is allowed."""
    err = exc.errors()[0]
    key = ".".join(str(part) for part in err["loc"])
    # The variable that set the key, or a table around it (CANCELPROC_REASON_CODES for reason_codes.0).
    names = [ENV_PREFIX + "__".join(str(part) for part in err["loc"][:n]).upper()
             for n in range(len(err["loc"]), 0, -1)]
    env_name = next((name for name in names if name in environ), None)
    source = f"environment variable {env_name}" if env_name else str(path or "settings")
    if err["type"] == "extra_forbidden":
        table = ".".join(str(part) for part in err["loc"][:-1])
        allowed = ", ".join(sorted(_keys(_model_at(err["loc"][:-1]))))
        message = f"unknown setting (allowed{f' in [{table}]' if table else ''}: {allowed})"
    else:
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], (dict, list)) and key not in _SECRET_KEYS:
            message += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    return f"{source}: {key}: {message}" + (f" (and {more} more)" if more else "")
