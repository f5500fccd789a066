# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, train a small VDM on the embedded digits, report test bpd,
#               write runs/demo/samples.png, export runs/demo/export/vdm/<version>/ for TF-Serving
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

$(INSTALLED): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m trainers.main --model_dir=runs/demo --export

test: $(INSTALLED)
	$(PY) -m pytest -q -n auto --dist loadfile tests

clean:
	rm -rf $(VENV) runs build *.egg-info
