# Shortcuts for scripts/ (the README's two commands work without make).
.PHONY: install demo test bench device-stack-gate gpu-check
install:
	bash scripts/install.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench: install
	.venv/bin/python -m pip install -q -c constraints.txt matplotlib  # the charts (the bench extra)
	.venv/bin/python benchmarks/run_all.py --out bench_out
device-stack-gate:  # the dry-run gate and interpreter tests under the GPU machine's torch 2.11 / triton 3.6
	bash scripts/device_stack_gate.sh
gpu-check:  # on a GPU machine: install, test and time everything in one command (dry run elsewhere)
	bash scripts/gpu_check.sh
