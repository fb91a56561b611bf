# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both set up a fresh checkout first (idempotent; the stamp file skips it next time).
PY ?= python3
STAMP := .setup.stamp

.PHONY: setup demo test data clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/ci.txt
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps -e .
	-$(MAKE) --no-print-directory data
	touch $(STAMP)

# Fashion-MNIST from Debian (optional: used for FD against real images and for training)
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "fashion-mnist: not installed (FD vs data will be skipped)"; \
	else echo "fashion-mnist: run 'sudo apt-get install dataset-fashion-mnist' for FD vs data"; fi

demo: setup
	$(PY) -m fourbit demo --out out/demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf out $(STAMP) .pytest_cache
