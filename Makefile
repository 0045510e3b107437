# Two commands on a fresh machine with python3 and make:
#   make demo   create .venv, install, build a demo database, run the nightly job, show the result
#   make test   install what the tests need and run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DB := var/demo.db
DEMO := CANCELPROC_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/cancelproc

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	@rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
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

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf $(VENV) var .pytest_cache
