# lungnode: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the test suite uses as real peers and validators. The scaled tests
# start Redis servers of their own; PostgreSQL and RabbitMQ are services the machine runs.
SYSTEM_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb poppler-utils chromium chromium-driver redis-server openssl
SYSTEM_TOOLS    := storescu echoscu dcmcjpeg dciodvfy Orthanc pdftotext chromium chromedriver redis-server openssl
# Orthanc's DICOMweb plugin (a DICOMweb peer for the tests), where Debian puts it.
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so

.PHONY: install run test lint drills screenshots system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)
	$(BIN)/lungnode db upgrade

run: install
	$(BIN)/lungnode serve

# Installs DCMTK, dicom3tools, Orthanc and its DICOMweb plugin, poppler-utils, Chromium and its driver (headless, for
# the docs page test), Redis and OpenSSL with apt-get when running as root and
# one of their tools is missing; otherwise says what is missing and goes on
# (under CI=true the tests that need a missing tool then fail).
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	test -e $(ORTHANC_DICOMWEB) || missing="$$missing orthanc-dicomweb"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(SYSTEM_PACKAGES) (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "warning: missing$$missing; install the Debian packages $(SYSTEM_PACKAGES)"; \
	  fi; \
	fi

# Two passes: the whole suite on SQLite, then the tests that touch a database again
# on PostgreSQL (127.0.0.1:5432, user postgres; LUNGNODE_TEST_POSTGRES_URL to change),
# each on a fresh database of its own. Without a reachable server the second pass
# skips them, and under CI=true fails them. Both passes run; either failing fails.
test: $(STAMP) system-deps
	@status=0; \
	$(BIN)/python -m pytest || status=1; \
	LUNGNODE_TEST_DATABASE=postgresql $(BIN)/python -m pytest || status=1; \
	exit $$status

# The reliability drills at full size (docs/reliability.md); minutes, not part of CI.
# Their figures go to build/drills/.
drills: $(STAMP) system-deps
	LUNGNODE_DRILLS=long $(BIN)/python -m pytest tests/drills -m drill

# The web console's pictures in docs/img/ (the README shows them), taken by its browser tests.
screenshots: $(STAMP) system-deps
	LUNGNODE_SCREENSHOTS=docs $(BIN)/python -m pytest tests/console

# ruff, mypy, and the layer contracts of DESIGN.md (import-linter, in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check lungnode tests scripts
	$(BIN)/ruff format --check lungnode tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
