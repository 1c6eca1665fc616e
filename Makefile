# Two entry points for a fresh machine: `make demo` and `make test`, both on the exact stack of
# requirements/lock.txt. `make test-lowest` runs the compatibility subset on the lowest supported
# versions (requirements/lowest.txt); `make lock` refreshes the lock.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LOWEST := requirements/lowest.txt
LOWEST_VENV := .venv-lowest
LOWEST_STAMP := $(LOWEST_VENV)/.installed
LABEL_STUDIO := requirements/label-studio.txt
LABEL_STUDIO_VENV := .venv-label-studio
LABEL_STUDIO_STAMP := $(LABEL_STUDIO_VENV)/.installed
# The review loop against a real Label Studio on the loopback address: its import of usam's
# tasks, and usam.serve connected as its ML backend, predicting and fine-tuning.
LABEL_STUDIO_TESTS := tests/test_label_studio_server.py tests/test_label_studio_loop.py

# Slow checks that CI runs besides `make test`: 15 to 60 s each, kept out of `make test` so that
# it stays under 15 minutes on 2 cores.
CI_SLOW_TESTS := \
	tests/test_install.py::test_the_wheel_keeps_the_torch_and_the_older_lightning_already_installed \
	tests/test_reproducibility.py::test_a_run_on_cached_data_logs_what_the_run_that_built_it_logged \
	tests/test_gpu_check.py::test_the_smoke_run_writes_every_part_and_says_its_weights_are_random \
	tests/test_training_stream.py::test_batches_mix_classes_like_a_full_shuffle_and_every_epoch_differs \
	tests/test_object_storage.py::test_killed_extraction_into_s3_resumes_with_every_image_once \
	tests/test_hq_backend.py::test_fit_runs_on_hq_and_its_head_refuses_another_backend \
	tests/test_fit_preemption.py::test_sigterm_saves_and_the_printed_command_resumes_to_the_uninterrupted_head \
	tests/test_eval_ranks.py::test_eval_on_two_ranks_writes_the_metrics_of_one_process \
	tests/test_vocabulary_scale.py::test_the_benchmark_prints_a_row_per_vocabulary_size \
	tests/test_slurm.py::test_a_preempted_slurm_job_stops_on_every_task_and_its_requeued_run_resumes

# What the lowest versions must run: the exactness contract, the training stream, the losses, the
# metrics against their references, fit / extract / eval / annotate / generate on tiny models, the
# review exports read back by their SDKs, the reviews read, fine-tuning, the ML backend and the
# SAM+CLIP baseline, less the long multi-process, kill-and-resume and real-subset runs that the
# full suite covers.
COMPAT_TESTS := tests/test_amg.py tests/test_training_stream.py tests/test_losses.py \
	tests/test_metric_references.py tests/test_fit.py tests/test_extract.py \
	tests/test_eval_cli.py tests/test_annotate.py tests/test_generate.py \
	tests/test_review_exports.py tests/test_clip_baseline.py tests/test_review_ingest.py \
	tests/test_finetune.py tests/test_serve.py
COMPAT_LEFT_OUT := other_kernels or ddp or kill or real_subsets or full_shuffle or \
	resume_after_a_crash or resumes_after or makes_masks_the_way or demo_runs or safety

export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-lowest test-label-studio test-ci-slow lock lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# sam2 (sam=sam2.1_*) is an sdist whose build imports torch: built against the locked torch,
# without its CUDA extension, before the rest of the lock asks for it.
$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install --quiet -c $(LOCK) torch torchvision
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-build-isolation -c $(LOCK) sam2
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(LOWEST_STAMP): $(LOWEST) pyproject.toml
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet -c $(LOWEST) -e '.[serve]' pytest
	touch $(LOWEST_STAMP)

$(LABEL_STUDIO_STAMP): $(LABEL_STUDIO)
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet -r $(LABEL_STUDIO)
	touch $(LABEL_STUDIO_STAMP)

demo: $(STAMP)
	$(BIN)/python -m usam.fit experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -m pytest -q $(COMPAT_TESTS) -k "not ($(COMPAT_LEFT_OUT))"

test-ci-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(CI_SLOW_TESTS)

# The label-studio executable goes at the end of PATH, so python and pytest stay usam's.
test-label-studio: $(STAMP) $(LABEL_STUDIO_STAMP)
	PATH="$$PATH:$(abspath $(LABEL_STUDIO_VENV))/bin" $(BIN)/python -m pytest -q -m integration \
		$(LABEL_STUDIO_TESTS)

# After a change to pyproject.toml; LOCK_ARGS=--upgrade moves every package to its newest release.
lock: $(STAMP)
	SAM2_BUILD_CUDA=0 $(BIN)/pip-compile --quiet --all-extras --unsafe-package=usam --no-build-isolation \
		--strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		$(LOCK_ARGS) --output-file=$(LOCK) pyproject.toml

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(LABEL_STUDIO_VENV) outputs
