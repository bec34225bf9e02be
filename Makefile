# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megasleep-installed

.PHONY: install demo test lint gpu-test study-rule110 study-depo clean

$(STAMP): pyproject.toml launch/install.sh
	bash launch/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m megasleep.cli demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

lint: $(STAMP)
	$(VENV)/bin/ruff check megasleep tests benchmarks data_pipelines launch

# The CPU studies of docs/results/: every (N, seed) through the real trainer, then the tables.
study-rule110: $(STAMP)
	$(PY) -m megasleep.cli study configs/studies/rule110-cpu.yaml

study-depo: $(STAMP)
	$(PY) -m megasleep.cli study configs/studies/depo-cpu.yaml

gpu-test: $(STAMP)
	$(PY) -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) build *.egg-info
