# Two commands do everything on a fresh Debian/Ubuntu machine:
#   make demo   install, then `saev-report build specs/demo.yaml` (offline, CPU, minutes)
#   make test   install, then the whole test suite (what CI runs)
#   make test-fast   the suite without `slow` and `browser` tests (no install)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Debian packages: demo photos (tuxpaint stamps) and the headless browser for site tests.
APT_PACKAGES := tuxpaint-stamps-default chromium chromium-driver

.PHONY: install system-deps python-deps reference-venv demo test test-fast wheel-check bench docs docs-site

install: system-deps python-deps

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# torch/torchvision are pinned to releases that install from this machine's local wheel cache.
python-deps:
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[demo,dev]"

demo: install
	saev-report build specs/demo.yaml

# saev 0.1.0, the paper's code, in its own venv (cached): tests/test_reference_saev.py runs it as the
# oracle for the SAE's update. It borrows this machine's torch (--system-site-packages) and installs only
# the packages saev.nn imports, so it costs seconds, not another torch.
REFERENCE_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/saev-report/reference-venv/saev-0.1.0
reference-venv: $(REFERENCE_VENV)/.built
$(REFERENCE_VENV)/.built:
	$(PYTHON) -m venv --system-site-packages $(REFERENCE_VENV)
	$(REFERENCE_VENV)/bin/python -m pip install -q --no-deps "saev==0.1.0"
	$(REFERENCE_VENV)/bin/python -m pip install -q "beartype>=0.19" "einops>=0.8" "jaxtyping>=0.2.34"
	PYTHONPATH= $(REFERENCE_VENV)/bin/python -c "import saev.nn, saev.config"
	touch $@

test: install reference-venv
	SAEV_REPORT_REQUIRE_REFERENCE=1 $(PYTHON) -m pytest -q

# The suite without the multi-process, whole-build and browser tests (markers in pyproject.toml): minutes, for iterating.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not browser"

# Build the wheel, install it (not editable) in a fresh venv and render a site with it (CI runs this).
wheel-check:
	PYTHON=$(PYTHON) bash .ci/wheel-check

bench:
	for b in bench/*.py; do echo "== $$b"; $(PYTHON) $$b --quick || exit 1; done

# Regenerate the reference pages (docs/reference/{spec,tables,cli,spec-errors}.md) from the code.
docs:
	$(PYTHON) -m saev_report.docs

# The documentation site, built strictly (a broken link or anchor fails it) into site-docs/ (CI runs this).
docs-site: docs
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --quiet
