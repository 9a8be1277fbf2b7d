# `make demo` and `make test` work as the first command on a fresh machine: each builds .venv
# when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# A CPU build of torch; an unpinned torch pulls several GB of CUDA packages.
TORCH  := torch==2.13.0

.PHONY: demo sweep sweep-digits test test-all bench bench-distill clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# The main job on the bundled example: separate a digits CNN to a quarter of its conv FLOPs,
# fit it on unlabeled images, distill it from the original, report, export to ONNX, verify.
demo: $(STAMP)
	mkdir -p examples/out
	$(VENV)/bin/convtool separate examples/digits_cnn.safetensors \
		--arch examples/digits_cnn.py:DigitsCNN --rank auto --flops-target 0.25 --sensitivity \
		--calibration examples/digits_train_images.npy --distill-steps 300 \
		-o examples/out/digits_cnn.separated.pt --onnx examples/out/digits_cnn.separated.onnx \
		--report examples/out/report.md --force

# The trade-off picture of the README: the trained CTC text reader of benchmarks/ocr.py at four FLOP
# budgets, each exported and timed against the original on onnxruntime CPU, scored by exact strings
# on 500 held-out lines (examples/ocr_metric.py; examples/ocr_data.py renders the lines);
# sweep-digits does the same for the 8x8 digits CNN. The plot extra brings matplotlib for
# sweep.png (and the fonts the lines are rendered in).
$(VENV)/.plot: $(STAMP)
	$(PY) -m pip install -q -e '.[cpu,plot]'
	touch $(VENV)/.plot

sweep: $(VENV)/.plot
	$(PY) examples/ocr_data.py examples/out/ocr
	$(VENV)/bin/convtool sweep benchmarks/ocr_net.safetensors --arch benchmarks/ocr.py:TextReader \
		--calibration examples/out/ocr/calibration.npy \
		--metric examples/ocr_metric.py:exact_strings --metric-data examples/out/ocr/test.npz \
		--targets 0.75,0.5,0.35,0.25 --runs 300 -o examples/out/sweep --force

sweep-digits: $(VENV)/.plot
	mkdir -p examples/out
	$(VENV)/bin/convtool sweep examples/digits_cnn.safetensors --arch examples/digits_cnn.py:DigitsCNN \
		--calibration examples/digits_train_images.npy \
		--metric examples/digits_metric.py:accuracy --metric-data examples/digits_test.npz \
		--targets 0.75,0.5,0.35,0.25 --runs 300 -o examples/out/sweep-digits --force

bench: $(STAMP)
	$(PY) benchmarks/convert_speed.py
	$(PY) benchmarks/accuracy.py

# Distillation throughput on 1 and 2 processes (torchrun, gloo), with the scaling efficiency.
bench-distill: $(STAMP)
	$(PY) benchmarks/distill_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache examples/out
