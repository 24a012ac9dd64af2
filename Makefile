# The two commands of the README. Both set everything up first (idempotent).
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/d2c demo $(ARGS)

test: setup
	.venv/bin/python -m pytest -q --durations=15 $(ARGS)
