# DICOM AI gateway - two commands on a fresh Debian/Ubuntu machine:
#   make run    set everything up, start Triton + the gateway on loopback
#   make test   set everything up, run lint, type checks and every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYVER := $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
APT_PACKAGES := dcmtk libdcmtk-dev strace dicom3tools orthanc orthanc-dicomweb pixelmed-apps default-jre-headless libpython$(PYVER) python3-venv postgresql chromium dicomscope xvfb xdotool imagemagick
# Node.js only where none is installed: a Node.js from NodeSource already carries npm and conflicts with Debian's.
NODE_PACKAGES := $(if $(shell command -v node),,nodejs) $(if $(shell command -v npm),,npm)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help setup system-deps venv models native ohif test-peers lint typecheck unit integration test run demo screenshots bench bench-report bench-stages clean

help:
	@echo "make run    - install what is needed, start Triton and the gateway on 127.0.0.1:11112"
	@echo "make test   - install what is needed, run ruff, mypy and the whole test suite (integration again on PostgreSQL)"
	@echo "make demo   - with the gateway running (make run), send one synthetic study per pipeline and show the results"
	@echo "make bench  - Locust load benchmark with the SLO gate (fails when a latency target is missed)"
	@echo "make bench-report - every throughput figure in one run, rewrites benchmarks/README.md (~10 min)"
	@echo "make bench-stages - per-stage latency of single studies through Orthanc"
	@echo "make models - (re)build the reference ONNX models deterministically"

setup: system-deps venv models native

# The native C-STORE receiver ([receiver] engine = "native"): DCMTK's networking, the gateway's durability rule.
NATIVE_SRC := gateway/ingest/native/gateway_storescp.cc
build/gateway-storescp: $(NATIVE_SRC)
	@mkdir -p build
	$(CXX) -O2 -std=c++17 -Wall -Wextra -o $@ $(NATIVE_SRC) -ldcmtls -ldcmnet -ldcmdata -loflog -lofstd -lssl -lcrypto -lpthread

native: system-deps build/gateway-storescp

# Debian packages: DCMTK and Orthanc are the PACS peers of the tests (Orthanc's DICOMweb plugin a STOW-RS sender),
# libdcmtk-dev builds the native receiver, strace checks its fsync-before-acknowledge order, dicom3tools and PixelMed validate results,
# libpython is what Triton's Python-backend stub links against; PostgreSQL is the shared system of record of
# several gateways (the tests start their own clusters on free loopback ports); Node.js runs the independent UPS
# worklist manager of the tests (dcmjs-dimse); Chromium runs the dashboard and OHIF tests, DICOMscope (under Xvfb,
# driven by xdotool, screenshots by ImageMagick) renders the GSPS as an independent presentation-state viewer.
system-deps:
	@missing=""; \
	for c in storescu dciodvfy Orthanc java node npm chromium dicomscope Xvfb xdotool import; do command -v $$c >/dev/null || missing=yes; done; \
	[ -f /usr/share/java/pixelmed.jar ] || missing=yes; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing=yes; \
	[ -f /usr/include/dcmtk/dcmnet/scp.h ] || missing=yes; \
	command -v strace >/dev/null || missing=yes; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=yes; \
	ldconfig -p | grep -q "libpython$(PYVER).so.1.0" || missing=yes; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing=yes; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(APT_PACKAGES) $(NODE_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) $(NODE_PACKAGES) >/dev/null; \
	  else \
	    echo "missing Debian packages; run as root or: sudo apt-get install $(APT_PACKAGES) $(NODE_PACKAGES)"; exit 1; \
	  fi; \
	fi
	@# Debian starts Orthanc and PostgreSQL services on install; the tests run their own instances on free ports.
	@if [ "$$(id -u)" = 0 ] && command -v service >/dev/null && [ -e /etc/init.d/orthanc ]; then service orthanc stop >/dev/null 2>&1 || true; fi
	@if [ "$$(id -u)" = 0 ] && command -v service >/dev/null && [ -e /etc/init.d/postgresql ]; then service postgresql stop >/dev/null 2>&1 || true; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The tests' UPS worklist manager (tests/support/ups, dcmjs-dimse), from its lock file.
UPS_PEER := tests/support/ups
$(UPS_PEER)/node_modules/.installed: $(UPS_PEER)/package.json $(UPS_PEER)/package-lock.json
	npm ci --prefix $(UPS_PEER) --no-audit --no-fund --loglevel=error
	touch $@

# OHIF Viewer's prebuilt build (the npm package @ohif/app holds dist/), served by the viewer tests in front of
# Orthanc's DICOMweb: `npm pack` fetches the tarball only, nothing is built or run by npm.
OHIF_VERSION := 3.13.2
OHIF_DIST := build/ohif/package/dist/index.html
$(OHIF_DIST):
	@mkdir -p build/ohif
	cd build/ohif && npm pack --silent --no-audit --no-fund @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz
	@touch $@

ohif: system-deps $(OHIF_DIST)

test-peers: system-deps $(UPS_PEER)/node_modules/.installed $(OHIF_DIST)

models: venv
	$(PY) scripts/build_models.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: setup test-peers
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

# The whole suite runs on SQLite (the default), then the whole integration suite again with every gateway on
# PostgreSQL (a throwaway cluster on a free loopback port per test worker). Three workers (pytest-xdist): most
# integration tests wait on servers, not on the CPU, so three fit a 2-core machine and halve the wall time.
TEST_WORKERS ?= 3

test: setup test-peers lint typecheck
	$(VENV)/bin/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --database=postgresql tests/integration $(PYTEST_ARGS)

run: setup
	$(VENV)/bin/gateway serve $(ARGS)

demo: venv
	$(VENV)/bin/gateway demo $(ARGS)

# The README's pictures: the browser test writes full-size screenshots to build/test-artifacts/; copied here.
screenshots: setup test-peers
	$(VENV)/bin/pytest -q tests/integration/test_dashboard.py
	$(VENV)/bin/pytest -q tests/integration/test_viewers.py
	cp build/test-artifacts/worklist.png build/test-artifacts/study.png build/test-artifacts/qa.png build/test-artifacts/models.png build/test-artifacts/operations.png tests/artifacts/
	cp build/test-artifacts/ohif-ct_head_hyperdensity.png tests/artifacts/ohif.png
	convert build/test-artifacts/dicomscope-gsps.png -crop 1340x1100+0+40 +repage -colors 64 tests/artifacts/dicomscope.png

bench: setup
	$(PY) -m benchmarks.run_bench $(ARGS)

bench-report: setup
	$(PY) -m benchmarks.report $(ARGS)

bench-stages: setup
	$(PY) -m benchmarks.e2e_latency $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
