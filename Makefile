# Two commands for a newcomer: `make demo` and `make test`. Both install what is missing first.
# `make bench` (not part of `make test`) also installs bpftrace, gdb and perf, then runs bench/run.py.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TARGETS := tests/targets/build

.PHONY: demo test stress fuzz bench bench-deps deps venv targets clean

demo: venv targets
	$(VENV)/bin/uprobes list $(TARGETS)/demo 'demo:*'
	$(VENV)/bin/uprobes trace -c '$(TARGETS)/demo 3' \
	    'uprobe:$(TARGETS)/demo:price_of item=+0(%di):string quantity=%si:s64' \
	    'uretprobe:$(TARGETS)/demo:price_of' \
	    'usdt:$(TARGETS)/demo:demo:order__start id=arg0 item=arg1:string quantity=arg2' \
	    'usdt:$(TARGETS)/demo:demo:order__done'

test: venv targets
	$(PY) -m pytest -q

stress: venv targets
	$(PY) -m pytest -q -m stress

# Every parser fed FUZZ_RUNS inputs by atheris (coverage-guided), or for FUZZ_SECONDS each if that comes first
# (0: no limit); stops at the first input that raises anything but our own error or hangs (saved under
# build/fuzz/TARGET/). `make test` runs a short hypothesis run of each.
FUZZ_RUNS ?= 1000000
FUZZ_SECONDS ?= 0
FUZZ_TARGETS := usdt-arguments probe fetchargs sdt-notes elf
fuzz: venv targets
	$(PY) -m pip install -q -e '.[test,fuzz]'
	@mkdir -p build
	@for target in $(FUZZ_TARGETS); do \
	    echo "fuzz $$target: $(FUZZ_RUNS) inputs"; \
	    $(PY) fuzz/run.py $$target $(FUZZ_RUNS) $(FUZZ_SECONDS) > build/fuzz-$$target.log 2>&1 || { tail -40 build/fuzz-$$target.log; exit 1; }; \
	    grep -E '^(Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))' build/fuzz-$$target.log; \
	done

# The per-hit table, insertion, listing, trace-rate and memory figures: bench/results.json and a table on stdout.
bench: venv targets bench-deps
	@$(MAKE) -s -C bench/targets
	$(PY) bench/run.py

deps:
	@scripts/install-deps

bench-deps: | deps
	@scripts/install-deps --bench

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
	rm -rf $(VENV) $(TARGETS) bench/targets/build build src/*.egg-info
