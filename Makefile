# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint docs data venv clean-venv

$(STAMP): pyproject.toml plugins/timm-ood-sklearn/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: on this project's machines pip takes 2.14.1 / 0.29.1 from local wheels
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet -e plugins/timm-ood-sklearn
	touch $(STAMP)

venv: $(STAMP)

data:
	@test -d $(FASHION_MNIST) || { apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist; }

demo: $(STAMP) data
	$(VENV)/bin/timm-ood demo

test: $(STAMP) data
	$(PY) -m pytest -n 2 -q tests plugins/timm-ood-sklearn/tests

docs: $(STAMP)
	$(PY) -m mkdocs build --strict    # the site in site/; `mkdocs serve` to browse it while editing

lint: $(STAMP)
	$(PY) -m pip install --quiet "ruff==0.17.6" "mypy==2.4.1"   # pinned: a new release may add rules
	$(PY) -m ruff check timm_ood tests benchmarks plugins
	$(PY) -m mypy timm_ood    # settings in pyproject.toml [tool.mypy]

clean-venv:
	rm -rf $(VENV)
