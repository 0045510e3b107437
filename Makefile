# Two commands on a fresh machine with python3 and make:
#   make demo   create .venv, install, make a demo app folder (var/demo/), run the nightly job, show the result
#   make test   install what the tests need, run make lint (ruff, mypy: zero findings), then the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo is an app folder of its own, made by `cancelproc init` as an operator's is.
# It is for a person, whether make runs on a terminal or not: readable log, summary table.
DEMO_DIR := var/demo
DEMO := cd $(DEMO_DIR) && CANCELPROC_LOG_FORMAT=console $(CURDIR)/$(BIN)/cancelproc

.PHONY: install demo lint test bench docs clean postgresql-binaries mariadb-binaries chromium-binaries report-screenshot

define SHOW_EML
import email, email.policy, sys
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        m = email.message_from_binary_file(f, policy=email.policy.default)
    for h in ("From", "To", "Subject", "Date", "Message-ID"):
        print(f"{h}: {m[h]}")
    print()
    print(m.get_body(("plain",)).get_content())
endef
export SHOW_EML

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	@rm -rf $(DEMO_DIR)
	@mkdir -p $(DEMO_DIR)
	$(DEMO) init --demo
	@echo; echo "== what tonight's run would do (--dry-run)"
	$(DEMO) run --dry-run
	@echo; echo "== the nightly run"
	$(DEMO) run --trigger manual
	@echo; echo "== the run record"
	$(DEMO) runs show last
	@echo; echo "== cancelled services"
	$(DEMO) services list --status Cancelled
	@echo; echo "== requests"
	$(DEMO) requests list
	@echo; echo "== emails (delivered to $(DEMO_DIR)/var/outbox/ as .eml files)"
	$(DEMO) emails list --limit 8
	@echo; echo "== the staff digest: $(DEMO_DIR)/var/outbox/*-cron_job_activity.eml, its headers and text part"
	@$(BIN)/python -c "$$SHOW_EML" $(DEMO_DIR)/var/outbox/*-cron_job_activity.eml

# $(call debian_package,PRESENT,PACKAGE,WHY,WHAT): unless the shell test PRESENT passes,
# install Debian's PACKAGE with apt (as root, else with sudo), saying WHY; with neither,
# warn that WHAT will be skipped. No commas inside the arguments.
define debian_package
@if $(1); then :; \
elif [ "$$(id -u)" = 0 ]; then \
  echo "installing Debian's $(2) ($(3))"; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
elif command -v sudo >/dev/null 2>&1; then \
  echo "installing Debian's $(2) with sudo ($(3))"; \
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
else echo "warning: no $(2) and no way to install it: $(4) will be skipped"; fi
endef

# The tests start a throwaway PostgreSQL server themselves (tests/pg_server.py); they
# need its binaries: Debian's postgresql package, installed here when they are missing.
postgresql-binaries:
	$(call debian_package,command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1,postgresql,the tests start their own server,the PostgreSQL tests)

# The WHMCS import tests read a throwaway MariaDB server they start themselves
# (tests/mariadb_server.py): Debian's mariadb-server, installed here when it is missing.
mariadb-binaries:
	$(call debian_package,command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ],mariadb-server,the WHMCS import tests start their own server,the WHMCS database tests)

# tests/test_report_html.py opens `report html`'s page in headless Chromium (no network):
# Debian's chromium, installed here when it is missing.
chromium-binaries:
	$(call debian_package,command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1,chromium,the HTML report test opens the page headless,the HTML report tests)

# docs/report-demo.png, the picture of `report html` in README: the demo company (init
# --demo, one run) in an app folder of its own, its page shot by headless Chromium.
SHOT_DIR := var/report-screenshot
report-screenshot: install chromium-binaries
	@rm -rf $(SHOT_DIR) && mkdir -p $(SHOT_DIR)
	cd $(SHOT_DIR) && $(CURDIR)/$(BIN)/cancelproc init --demo >/dev/null && \
	  $(CURDIR)/$(BIN)/cancelproc run --trigger manual >/dev/null 2>&1; \
	  $(CURDIR)/$(BIN)/cancelproc report html --out report.html
	chromium --headless --disable-gpu --hide-scrollbars $$( [ "$$(id -u)" = 0 ] && echo --no-sandbox ) \
	  --window-size=1100,1560 --virtual-time-budget=10000 --user-data-dir=$(CURDIR)/$(SHOT_DIR)/profile \
	  --host-resolver-rules="MAP * ~NOTFOUND" --screenshot=$(CURDIR)/docs/report-demo.png \
	  file://$(CURDIR)/$(SHOT_DIR)/report.html 2>/dev/null

# Zero findings: ruff (lint and import order) on the code and the tests, mypy on the package.
lint: install
	$(BIN)/ruff check processor tests bench
	$(BIN)/mypy

test: install lint postgresql-binaries mariadb-binaries chromium-binaries
	$(BIN)/python -m pytest -q

# docs/architecture.md's dependency lines, from the imports (tests/test_docs.py fails when they are stale)
docs: install
	$(BIN)/cog -I . -r docs/architecture.md

bench: install
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache
