# fedtray — the README's two commands are `make demo` and `make test`; both set up .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest workers: independent slow tests run in parallel (pytest-xdist).
JOBS   ?= auto

.PHONY: venv system-deps test lint typecheck unit demo bench clean package

$(STAMP): pyproject.toml constraints.txt
	@bash .ci/install-system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to ==2.13.0 (CPU build) in the `train` extra and in constraints.txt.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,tray,dev,package,cluster]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages for PyGObject (the tray) and for the tray/dashboard tests (needs root
# or sudo; does nothing when they are present).
system-deps:
	bash .ci/install-system-packages

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -n $(JOBS) --dist loadfile -q

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/fedtray-server demo --clients 3 --rounds 10

bench: $(STAMP)
	$(BIN)/python -m benchmarks.codec

# The desktop bundle (PyInstaller) and the Linux .deb: dist/fedtray/ and
# dist/fedtray_<version>_<arch>.deb (see packaging/README.md for Windows and macOS).
package: $(STAMP)
	PYTHON=$(CURDIR)/$(BIN)/python bash packaging/build-linux.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
