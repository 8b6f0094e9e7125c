# Two commands for a newcomer: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TARGETS := tests/targets/build

.PHONY: demo test deps venv targets clean

demo: venv targets
	$(VENV)/bin/uprobes list $(TARGETS)/demo
	$(VENV)/bin/uprobes resolve 'usdt:$(TARGETS)/demo:demo:order__start' 'uretprobe:$(TARGETS)/demo:price_of ret=$$retval:s64'

test: venv targets
	$(PY) -m pytest -q

deps:
	@scripts/install-deps

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "uprobes needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

targets: | deps
	@$(MAKE) -s -C tests/targets

clean:
	rm -rf $(VENV) $(TARGETS) build src/*.egg-info
