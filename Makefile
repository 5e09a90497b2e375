# Shortcuts for scripts/ (the README's two commands work without make).
.PHONY: install demo test bench
install:
	bash scripts/install.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench: install
	.venv/bin/python -m pip install -q -c constraints.txt matplotlib  # the charts (the bench extra)
	.venv/bin/python benchmarks/run_all.py --out bench_out
