"""Configuration: the shipped file, environment overrides, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from processor.config import (
    EmailSettings,
    Settings,
    SmtpSettings,
    WhmcsImportSettings,
    load_settings,
    settings_without_errors,
)
from processor.errors import ConfigError
from processor.resources import shipped


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    path = tmp_path / "config" / "processor.toml"
    path.write_text(text)
    return path


SHIPPED = shipped("app", "config", "processor.toml")  # what `cancelproc init` writes to config/


def test_shipped_config_has_every_setting_commented_out_at_its_default(tmp_path):
    """Every key of every section has a line `# key = default`; uncommenting them all
    gives the defaults; no line sets a value (the operator's file starts as the defaults)."""
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    found: dict[str, set[str]] = {"": set()}
    section = ""
    for n, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
            found.setdefault(section, set())
        elif match := re.fullmatch(r"# ([a-z_]+) = (.+)", line):
            found[section].add(match.group(1))
            lines[n] = f"{match.group(1)} = {match.group(2)}"
        else:
            assert not re.match(r"\s*[a-z_]+\s*=", line), f"line {n + 1} sets a value: {line}"
    models: dict[str, type[BaseModel]] = {"": Settings, "email": EmailSettings, "email.smtp": SmtpSettings,
                                          "whmcs": WhmcsImportSettings}
    for name, model in models.items():
        keys = {key for key, field in model.model_fields.items()
                if not field.exclude and key not in ("email", "smtp", "whmcs", "products")}
        assert found.get(name) == keys, f"[{name or 'top level'}]: missing {sorted(keys - found.get(name, set()))}, " \
                                        f"unknown {sorted(found.get(name, set()) - keys)}"
    uncommented = write(tmp_path, "\n".join(lines) + "\n")
    settings = load_settings(uncommented)
    assert settings.model_dump() == Settings(app_root=settings.app_root).model_dump()
    assert load_settings(write(tmp_path, SHIPPED.read_text(encoding="utf-8"))).model_dump() == settings.model_dump()


def test_paths_are_relative_to_the_app_root(tmp_path):
    settings = load_settings(write(tmp_path, 'database_url = "sqlite:///var/x.db"\n'))
    assert settings.app_root == tmp_path.resolve()
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path.resolve()}/var/x.db"


def test_environment_beats_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CANCELPROC_CHUNK_SIZE", "250")
    monkeypatch.setenv("CANCELPROC_EMAIL__COMPANY_NAME", "Acme Hosting")
    settings = load_settings(write(tmp_path, "chunk_size = 500\n"))
    assert (settings.chunk_size, settings.email.company_name) == (250, "Acme Hosting")


def test_whmcs_settings_from_the_file_and_the_environment(tmp_path, monkeypatch):
    text = '[whmcs]\ndefault_language = "de"\nreason_keywords = {"zu teuer" = "too_expensive"}\n'
    settings = load_settings(write(tmp_path, text))
    assert (settings.whmcs.default_language, settings.whmcs.reason_keywords) == ("de", {"zu teuer": "too_expensive"})
    monkeypatch.setenv("CANCELPROC_WHMCS__REASON_KEYWORDS", '{"support": "customer_service"}')
    # A table from the environment is merged into the file's (pydantic-settings merges tables).
    assert load_settings(write(tmp_path, text)).whmcs.reason_keywords == {
        "zu teuer": "too_expensive", "support": "customer_service"}
    # Not JSON: the message names the variable, not only its section.
    monkeypatch.setenv("CANCELPROC_WHMCS__REASON_KEYWORDS", "{support = customer_service}")
    with pytest.raises(ConfigError, match=r"^environment variable CANCELPROC_WHMCS__REASON_KEYWORDS: "
                                          r"whmcs\.reason_keywords: not valid JSON"):
        load_settings(write(tmp_path, text))
    monkeypatch.delenv("CANCELPROC_WHMCS__REASON_KEYWORDS")
    with pytest.raises(ConfigError, match=r"whmcs\.reason_keywords: a keyword must not be empty"):
        load_settings(write(tmp_path, '[whmcs]\nreason_keywords = {" " = "other"}\n'))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chunk_size = 0\n", "chunk_size: Input should be greater than or equal to 1 (got 0)"),
        ('business_timezone = "Mars/Olympus"\n', "business_timezone: unknown time zone 'Mars/Olympus'"),
        ("chunksize = 10\n", "chunksize: unknown setting (allowed: business_timezone,"),
        ('log_format = "xml"\n', "log_format: Input should be 'auto', 'json' or 'console'"),
        ("reason_codes = []\n", "reason_codes: List should have at least 1 item"),
        ("[email]\ncompany = 'x'\n",
         "email.company: unknown setting (allowed in [email]: admin_url, company_name, currency, "),
        ("[email.smtp]\nhostname = 'x'\n",
         "email.smtp.hostname: unknown setting (allowed in [email.smtp]: ca_file, host, "),
        ("chunk_size = \n", "not valid TOML"),
    ],
)
def test_bad_values_name_file_key_and_what_is_allowed(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    line = str(exc.value)
    assert line.startswith(f"{path}: ") and message in line and "\n" not in line


def test_product_tables_by_external_id_or_name_over_the_defaults(tmp_path):
    text = ("reminder_days = [1, 7]\n"
            '[products."12"]\ngrace_days = 14\nnotice_days = 30\n'
            '[products."Dedicated Server"]\nminimum_term_months = 12\nreminder_days = []\n')
    settings = load_settings(write(tmp_path, text))
    assert settings.reminder_days == [7, 1]  # the latest reminder last, however written
    by_id = settings.for_product("12", "Shared Hosting")
    assert (by_id.grace_days, by_id.notice_days, by_id.minimum_term_months, by_id.reminder_days) == (14, 30, 0, [7, 1])
    by_name = settings.for_product(None, "Dedicated Server")
    assert (by_name.minimum_term_months, by_name.reminder_days) == (12, [])
    other = settings.for_product("99", "VPS")
    assert (other.grace_days, other.notice_days, other.minimum_term_months, other.reminder_days) == (0, 0, 0, [7, 1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[products."12"]\ngrace_days = -1\n', "products.12.grace_days: Input should be greater than or equal to 0"),
        ('[products."12"]\ngrace = 5\n', "products.12.grace: unknown setting"),
        ("reminder_days = [7, 7]\n", "reminder_days: [7, 7]: each day at most once"),
        ("reminder_days = [0]\n", "reminder_days.0: Input should be greater than or equal to 1"),
    ],
)
def test_bad_product_settings_name_the_product_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_bad_environment_value_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CANCELPROC_MAX_ATTEMPTS", "many")
    with pytest.raises(ConfigError, match=r"^environment variable CANCELPROC_MAX_ATTEMPTS: max_attempts: "):
        load_settings(write(tmp_path, ""))


@pytest.mark.parametrize(("name", "hint"), [
    ("CANCELPROC_EMAIL_DELIVERY", "did you mean CANCELPROC_EMAIL__DELIVERY?"),
    ("cancelproc_chunksize", "did you mean CANCELPROC_CHUNK_SIZE?"),
    ("CANCELPROC_FOO", "settings are CANCELPROC_ and the key in capitals, tables joined by '__' "
                       "(CANCELPROC_EMAIL__DELIVERY)"),
])
def test_unknown_environment_variable_names_the_closest_setting(tmp_path, monkeypatch, name, hint):
    monkeypatch.setenv(name, "1")
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, ""))
    assert str(exc.value) == f"environment variable {name}: not a cancelproc setting; {hint}"


def test_unknown_key_of_a_table_in_a_variable_lists_that_table(tmp_path, monkeypatch):
    monkeypatch.setenv("CANCELPROC_EMAIL__SMTP_HOST", "mail.example.test")
    with pytest.raises(ConfigError, match=r"^environment variable CANCELPROC_EMAIL__SMTP_HOST: email.smtp_host: "
                       r"unknown setting \(allowed in \[email\]: admin_url, company_name, currency, delivery, "):
        load_settings(write(tmp_path, ""))


def test_the_other_variables_cancelproc_reads_are_not_refused(tmp_path, monkeypatch):
    """--debug and hook tracing from the environment, a nested setting, and the SMTP
    password's variable wherever password_env points."""
    for name, value in (("CANCELPROC_DEBUG", "1"), ("CANCELPROC_TRACE_HOOKS", "1"),
                        ("CANCELPROC_EMAIL__SMTP__HOST", "mail.example.test"),
                        ("CANCELPROC_SMTP_PASSWORD_NIGHTLY", "secret")):
        monkeypatch.setenv(name, value)
    settings = load_settings(write(tmp_path, '[email.smtp]\npassword_env = "CANCELPROC_SMTP_PASSWORD_NIGHTLY"\n'))
    assert settings.email.smtp.host == "mail.example.test"


def test_missing_explicit_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_a_config_that_does_not_load_names_its_file_and_keeps_its_good_keys(tmp_path, monkeypatch):
    """For the nightly job's failure record (cli/app.py): the wrong keys at their defaults,
    the rest as the operator wrote them."""
    config = tmp_path / "config" / "processor.toml"
    config.parent.mkdir()
    config.write_text('metrics_file = "var/m.prom"\nreason_codes = [1]\nemial = 1\n\n[email]\nstaff_address = '
                      '"ops@example.test"\n\n[email.smtp]\nhost = "mail.example.test"\nport = "twenty-five"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert caught.value.config_file == config.resolve()
    kept = settings_without_errors(config)
    assert kept is not None and kept.app_root == tmp_path.resolve()
    assert (kept.metrics_file, kept.email.staff_address, kept.email.smtp.host) == (
        "var/m.prom", "ops@example.test", "mail.example.test")
    assert (kept.reason_codes, kept.email.smtp.port) == (Settings().reason_codes, SmtpSettings().port)
    monkeypatch.setenv("CANCELPROC_BUSINESS_TIMEZONE", "Mars/Olympus")  # not the file's: nothing to leave out
    assert settings_without_errors(config) is None
    config.write_text("[email\n")
    assert settings_without_errors(config) is None
