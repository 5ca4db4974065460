# The whole set-up on a fresh machine is `make demo` or `make test`.
# torch is installed first and pinned to the CPU build that lies on local disk;
# the project itself only asks for a range (torch>=2.4).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
DEMO    ?= demo_out
DEMO_TRAIN ?= --max-len 512 --save-every 100 --head-width 128 --head-proj-hidden 128 --head-layers 1 --head-dim 32
DEMO_TRAIN_IMAGES ?= 1000
# torch and faiss both spin OpenMP threads; passive waiting stops them fighting over 2 cores
export OMP_WAIT_POLICY ?= PASSIVE
# DeepSpeed's compiled ops: one cache per environment, inside the venv (asvr-train's own default)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/.cache/torch_extensions

.PHONY: install lint test test-all mutation demo experiment bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[cpu]"
	# lmms-eval's own scoring code for tests/test_eval_scoring.py (loaded by path, none of its
	# dependencies needed; with them pip would replace the CPU torch by a CUDA build)
	$(BIN)/python -m pip install -q --no-deps "lmms-eval==0.7.3" "loguru>=0.7"
	touch $(STAMP)

# ruff (lint + format check), the import rule of docs/ARCHITECTURE.md (import-linter)
# and mypy.  The asvr.* packages live in core/, tokenizer/, pipeline/, train/, eval/, demo/ (see
# package-dir); import-linter and mypy read them through a symlinked asvr/ in .lint/.
LINT_ROOT := .lint
lint: $(STAMP)
	@mkdir -p $(LINT_ROOT)/asvr && for p in core tokenizer pipeline train eval demo; do ln -sfn ../../$$p $(LINT_ROOT)/asvr/$$p; done
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	cd $(LINT_ROOT) && PYTHONPATH=. ../$(BIN)/python -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' --config ../pyproject.toml
	cd $(LINT_ROOT) && ../$(BIN)/python -m mypy --config-file ../pyproject.toml

test: lint
	$(BIN)/python -m pytest -q tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" tests

# Mutation testing of the core modules (mutmut; not part of `make test`): one staging
# copy per module under .mutation/, its fast tests only; survivors are triaged in
# docs/TESTING.md.  `make mutation MUTATION="quantizer packing"` runs a subset.
MUTATION ?=
mutation: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[mutation]"
	$(BIN)/python tools/mutation.py $(MUTATION)

# The whole job on the embedded default, offline, on 2 CPUs (~10 min):
# corpus -> codebook -> validate -> tokenize (Ray) -> index/search/inspect (faiss)
# -> pretrain + SFT (DeepSpeed, tiny Llama) -> eval.  Everything lands in $(DEMO)/.
demo: $(STAMP)
	@echo "== 1/9 procedural VQA corpus (held-out images show colour-shape pairs never seen in training)"
	$(BIN)/python -m asvr.demo.vqa_corpus --out $(DEMO)/corpus --train $(DEMO_TRAIN_IMAGES) --heldout 60 --seed 0 --quiet
	@echo "== 2/9 train the default codebook (EfficientNet-Lite0, 4 x 256)"
	$(BIN)/asvr-tokenizer train --images $(DEMO)/corpus/images/train --encoder efficientnet_lite0 \
	  --depth 4 --codebook-size 256 --method kmeans --seed 0 --overwrite --out $(DEMO)/tokenizer
	@echo "== 3/9 validate it on held-out images"
	$(BIN)/asvr-tokenizer validate $(DEMO)/tokenizer --images $(DEMO)/corpus/images/heldout --report $(DEMO)/tokenizer_report
	@echo "== 4/9 tokenize the corpus once (Ray Data)"
	$(BIN)/asvr-pipeline tokenize $(DEMO)/corpus/images --tokenizer $(DEMO)/tokenizer --out $(DEMO)/codes
	$(BIN)/asvr-pipeline verify $(DEMO)/codes
	$(BIN)/asvr-pipeline inspect $(DEMO)/codes
	@echo "== 5/9 faiss index, search contact sheet, codebook inspection"
	$(BIN)/asvr-tokenizer index $(DEMO)/codes --tokenizer $(DEMO)/tokenizer --out $(DEMO)/index --force --quiet
	$(BIN)/asvr-tokenizer search $(DEMO)/index --key "$$($(BIN)/python -c "import json;print(json.load(open('$(DEMO)/corpus/llava_pretrain.json'))[0]['image'])")" \
	  -k 11 --images $(DEMO)/corpus/images --sheet $(DEMO)/search_sheet.png
	$(BIN)/asvr-tokenizer inspect $(DEMO)/tokenizer --codes $(DEMO)/codes --images $(DEMO)/corpus/images \
	  --report $(DEMO)/inspect --code 0:top --nearest 0:top --quiet
	@echo "== 6/9 a tiny Llama-style LLM built from a config"
	$(BIN)/python -m asvr.demo.tiny_llm --out $(DEMO)/llm --hidden-size 128 --intermediate-size 256 \
	  --texts $(DEMO)/corpus/llava_pretrain.json $(DEMO)/corpus/llava_sft.json
	@echo "== 7/9 pretrain (projector + visual head) on EfficientNet features cached once"
	$(BIN)/asvr-train --model $(DEMO)/llm --tokenizer $(DEMO)/tokenizer --codes $(DEMO)/codes \
	  --data $(DEMO)/corpus/llava_pretrain.json --stage pretrain --vision-input features --images $(DEMO)/corpus/images \
	  --cache-dir $(DEMO)/cache $(DEMO_TRAIN) --max-steps 60 --micro-batch-size 4 --overwrite --output-dir $(DEMO)/runs/pretrain
	@echo "== 8/9 SFT from the pretrain run"
	$(BIN)/asvr-train --model $(DEMO)/llm --tokenizer $(DEMO)/tokenizer --codes $(DEMO)/codes \
	  --data $(DEMO)/corpus/llava_sft.json --stage sft --vision-input features --images $(DEMO)/corpus/images \
	  --cache-dir $(DEMO)/cache --init-from $(DEMO)/runs/pretrain \
	  $(DEMO_TRAIN) --max-steps 1000 --micro-batch-size 4 --lr 2e-3 --overwrite --output-dir $(DEMO)/runs/sft
	@echo "== 9/9 evaluate"
	$(BIN)/asvr-eval loss --model $(DEMO)/runs/sft --codes $(DEMO)/codes --data $(DEMO)/corpus/heldout_sft.json \
	  --images $(DEMO)/corpus/images --out $(DEMO)/eval/loss
	$(BIN)/asvr-eval bench --model $(DEMO)/runs/sft --bench $(DEMO)/corpus/vqa_bench_seen.jsonl $(DEMO)/corpus/vqa_bench.jsonl \
	  --images $(DEMO)/corpus/images \
	  --max-new-tokens 4 --out $(DEMO)/eval/bench
	@echo "demo done: see $(DEMO)/tokenizer_report, $(DEMO)/search_sheet.png, $(DEMO)/inspect, $(DEMO)/runs/*/loss.png, $(DEMO)/eval"

# The seeded miniature of the paper's ablation (arms a-e x 3 seeds, CPU): results and plot
# land in bench/results/asvr_effect/ (work files in $(EXP)/; rerun to resume).
EXP ?= exp_out
experiment: $(STAMP)
	$(BIN)/python -m bench.asvr_effect --out $(EXP) --results bench/results/asvr_effect

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache $(LINT_ROOT)
